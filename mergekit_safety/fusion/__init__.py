"""The fusion framework: the pure kernel and everything a method is built from.

``kernel`` (:func:`~.kernel.fuse`, backbones, the per-tensor slots), ``settings`` (a method's
single declaration of its parameters), ``method`` (method base classes), ``locate`` (config-only
artifacts: computed on first use, fingerprinted, stale ones refused), ``artifacts`` (the file
format), ``models`` (model references → folders), ``sources`` (a fusion as a weight source).
Nothing here knows mergekit's plugin API (see :mod:`mergekit_safety.plugin`).
"""
