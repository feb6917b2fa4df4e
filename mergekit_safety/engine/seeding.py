"""Per-tensor seeds: reproducible randomness whatever the execution order or thread.

mergekit runs tensors in any order (and in threads with ``--multi-gpu``), so anything random
per tensor (DARE's drop, random control masks) is seeded from a run seed and the tensor's
name. Every module uses this one formula, so training, locating and merging draw the same.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Optional


def tensor_seed(seed: int, name: str, offset: int = 0) -> int:
    """The seed of tensor ``name`` in a run seeded ``seed`` (``offset`` separates streams)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode()) + offset) % (2**63)


@contextlib.contextmanager
def seeded(seed: Optional[int], name: str):
    """Run the block with torch's global RNG seeded for tensor ``name`` (restored after);
    ``seed`` None leaves the global RNG alone (mergekit's own behaviour)."""
    if seed is None:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tensor_seed(seed, name))
        yield
