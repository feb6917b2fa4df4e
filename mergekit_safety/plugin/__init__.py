"""The mergekit glue: the only code that knows mergekit 0.1.5's internals.

* :mod:`.hook` — the ``.pth`` import hook that registers plugins in plain ``mergekit-yaml``;
* :mod:`.registration` — registration in mergekit's registry, and the ``methods`` listing;
* :mod:`.adapter` — a :class:`~mergekit_safety.fusion.method.FusionMethod` as a mergekit
  ``GroupMergeMethod`` (its spec derived from the method's settings, the plan-time lookup);
* :mod:`.config` — merge YAML → locate request;
* :mod:`.checks` — ``mergekit-safety check`` and the plan-time check.

Import-light: this ``__init__`` imports nothing, since the hook runs at interpreter start.
"""
