"""SOMF: subspace-oriented model fusion (Yi et al., arXiv 2405.09055).

``method`` (every parameter in ``SOMFSettings``, and the merge kernel), ``training`` (the
locate step: mask learning through the functionally fused model), ``masks`` (merge-time masks
and the equal-density random control).
"""
