"""One module per merge method; each subclasses the shared core (mergekit_safety.core)."""

from __future__ import annotations

from typing import List


def all_methods() -> List:
    from mergekit_safety.methods.antidote import Antidote
    from mergekit_safety.methods.masked_fusion import MaskedFusionMethod
    from mergekit_safety.methods.somf import SOMF
    from mergekit_safety.methods.ssah import SSAHMethod

    return [MaskedFusionMethod(), SOMF(), Antidote(), SSAHMethod()]
