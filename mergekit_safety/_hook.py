"""Kept for ``mergekit_safety_plugins.pth`` (``import mergekit_safety._hook``): the discovery
hook lives in :mod:`mergekit_safety.plugin.hook`. Standard library only, like the hook."""

from mergekit_safety.plugin.hook import (  # noqa: F401  (importing it installs the hook)
    ENTRY_POINT_GROUP,
    TARGET_MODULE,
    _state,
    install,
    load_plugins,
)
