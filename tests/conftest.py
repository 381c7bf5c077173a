"""Suite-wide fixtures."""
import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environ():
    """Every test leaves os.environ as it found it: code under test (rendezvous, SLURM job set-up) writes RANK,
    WORLD_SIZE, MASTER_ADDR/PORT into the process environment, which a later in-process test (accelerate's
    PartialState in radio-eval) would otherwise take for a distributed launch."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
