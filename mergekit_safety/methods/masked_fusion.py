"""``masked_fusion``: the shared core exposed as a method of its own.

Use it with a mask artifact written by any tool (roles ``keep``, ``post_keep``, ``zero``;
see :mod:`mergekit_safety.fusion.artifacts`), or with no mask at all, in which case it is
exactly the chosen mergekit backbone with task vectors taken against the aligned ``base_model``.
"""

from mergekit_safety.fusion.method import FusionMethod


class MaskedFusionMethod(FusionMethod):
    name = "masked_fusion"
