"""mergekit-safety: merge methods that restore the aligned model's safety while merging.

This module stays import-light on purpose: the plugin hook imports the package at
interpreter start in every Python process, so nothing heavy (torch, mergekit) may be
imported here. Heavy modules are imported where they are used.
"""

__version__ = "0.1.0"
