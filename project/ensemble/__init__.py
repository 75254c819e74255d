"""The study's ensemble: out-of-fold predictions of every trial, greedy selection with replacement
on them (``selection``), and the scikit-learn estimators a preset adds to its library
(``estimators``)."""
