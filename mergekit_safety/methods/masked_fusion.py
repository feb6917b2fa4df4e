"""``masked_fusion``: the shared core exposed as a method of its own.

Use it with a mask artifact written by any tool (roles ``keep``, ``post_keep``, ``zero``;
see mergekit_safety.artifacts), or with no mask at all, in which case it is exactly the
chosen mergekit backbone with task vectors taken against the aligned ``base_model``.
"""

from mergekit_safety.core import MaskedFusion


class MaskedFusionMethod(MaskedFusion):
    name = "masked_fusion"
