"""The Optuna sweep: the search space (``space``), pruning, the study and its worker processes
(``study``), their recovery after a crash (``recovery``), the trials' kept files (``kept``), plots,
and the export of a study's deliverables (``export``)."""
