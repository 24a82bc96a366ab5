"""The seeds of every random choice a data stream makes: one 32-bit seed per purpose, derived from
the run's seed and the stream's place (rank, worker, epoch, ...), so that each is reproducible on its
own and no two purposes share a generator."""

from __future__ import annotations

import numpy as np

# purposes, the last part of a seed (``stream_seed(seed, rank, worker, epoch, PURPOSE, ...)``)
SHARDS, SHUFFLE, PROCESS, VALIDATION, MIX = 0, 1, 2, 3, 4
# a stream that cannot continue exactly (another number of ranks or workers than the checkpoint's)
# starts afresh from a seed that also holds this and the batch it starts at
RESEED = 5


def stream_seed(*parts: int) -> int:
    """One 32-bit seed from any number of non-negative integers (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(1)[0])
