"""Kept for the entry point ``mergekit_safety.registration:register_methods`` (group
``mergekit.merge_methods``): registration lives in :mod:`mergekit_safety.plugin.registration`."""

from mergekit_safety.plugin.registration import describe_methods, package_methods, register_methods

__all__ = ["describe_methods", "package_methods", "register_methods"]
