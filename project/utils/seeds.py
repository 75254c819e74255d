"""Every random stream of a run, derived from its ``--seed`` in one place.

A stream is named by its purpose and the ids that make it distinct (a member, a trial), so a
fold's model draws the same initialisation, batches and augmentation whether it trains alone
or stacked beside other folds, and no two purposes share a stream.
"""

from __future__ import annotations

import numpy as np

PURPOSES = {"init": 1, "batches": 2, "augment": 3, "trial": 4}


def derive_seed(seed: int, purpose: str, *ids: int) -> int:
    """A 32-bit seed for ``purpose`` (one of PURPOSES) and ``ids``, from the run's seed."""
    entropy = [seed % 2**63, PURPOSES[purpose], *(i % 2**63 for i in ids)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])
