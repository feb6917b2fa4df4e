"""The merge methods: one module (or package) each, all built on :mod:`mergekit_safety.fusion`.

Adding a method is one module and one line below (docs/adding_a_method.md).
"""

from __future__ import annotations

from typing import List


def all_methods() -> List:
    """A fresh instance of every method this package registers in mergekit."""
    from mergekit_safety.methods.antidote import Antidote
    from mergekit_safety.methods.masked_fusion import MaskedFusionMethod
    from mergekit_safety.methods.resta import RESTA
    from mergekit_safety.methods.safe_lora import SafeLoRA
    from mergekit_safety.methods.safemerge import SafeMerge
    from mergekit_safety.methods.somf.method import SOMF
    from mergekit_safety.methods.ssah.method import SSAHMethod

    return [MaskedFusionMethod(), SOMF(), Antidote(), SSAHMethod(), RESTA(), SafeLoRA(), SafeMerge()]
