"""Plugin discovery for plain mergekit, installed by ``mergekit_safety_plugins.pth``.

mergekit 0.1.5 reads no entry points, so ``mergekit-yaml`` would never see a plugin's
methods. Site's ``.pth`` processing imports this module at interpreter start. It must stay
standard-library only and cheap (~1 ms): it imports neither torch nor mergekit. It puts a
meta-path finder in front of the import system that waits for the package
``mergekit.merge_methods`` to finish executing (the registry is complete by then; firing on
``...registry`` would see a half-initialised package), and then calls every entry point of
the group ``mergekit.merge_methods``, this package's and any other plugin's.

Guarantees:
- idempotent: in a venv the ``.pth`` line can run twice per start; only one finder is
  installed, and each entry point runs at most once per process;
- a broken plugin warns and leaves mergekit working;
- ``MERGEKIT_SAFETY_DISABLE=1`` (this package) or ``MERGEKIT_PLUGINS_DISABLE=1`` (every
  plugin of the group) turns discovery off.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import Loader, MetaPathFinder

ENTRY_POINT_GROUP = "mergekit.merge_methods"
TARGET_MODULE = "mergekit.merge_methods"
#: entry points called with the MergeConfiguration before ``mergekit.merge.run_merge`` does
#: anything (mergekit resolves models and may query the hub before any method is asked)
PRE_MERGE_GROUP = "mergekit.pre_merge"
#: entry points called with (config, out_path, options) after ``run_merge`` wrote the model
#: (e.g. a plugin's section of the model card)
POST_MERGE_GROUP = "mergekit.post_merge"
RUN_MERGE_MODULE = "mergekit.merge"
_DISABLE_ALL = "MERGEKIT_PLUGINS_DISABLE"
_DISABLE_THIS = "MERGEKIT_SAFETY_DISABLE"
_THIS_DISTRIBUTION = "mergekit-safety"
# Kept on the sys module so a second import of this file (a second .pth run, or a reload)
# shares the state instead of installing a second finder.
_STATE_ATTR = "_mergekit_plugin_hook_state"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def _state() -> dict:
    state = getattr(sys, _STATE_ATTR, None)
    if state is None:
        state = {"loaded": set(), "finder": None}
        setattr(sys, _STATE_ATTR, state)
    return state


def load_plugins() -> list[str]:
    """Run each entry point of the group once; return the names that ran successfully."""
    import warnings

    if _truthy(os.environ.get(_DISABLE_ALL)):
        return []
    state = _state()
    ran = []
    for entry_point in _enabled_entry_points(ENTRY_POINT_GROUP):
        key = (entry_point.name, entry_point.value)
        if key in state["loaded"]:
            continue
        state["loaded"].add(key)
        try:
            entry_point.load()()
        except Exception as error:  # a plugin must never break mergekit itself
            warnings.warn(
                f"mergekit plugin {entry_point.name!r} ({entry_point.value}) failed to "
                f"register its merge methods and was skipped: {type(error).__name__}: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        ran.append(entry_point.name)
    return ran


class _RunAfterExec(Loader):
    """Wraps the real loader of mergekit.merge_methods and runs the plugins after it."""

    def __init__(self, wrapped: Loader):
        self._wrapped = wrapped

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)
        load_plugins()

    def __getattr__(self, name):  # get_resource_reader, is_package, get_code, ...
        return getattr(self._wrapped, name)


class _AfterExec(Loader):
    """Wraps a module's real loader and calls ``callback(module)`` after it executed."""

    def __init__(self, wrapped: Loader, callback):
        self._wrapped = wrapped
        self._callback = callback

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):
        return getattr(self._wrapped, name)


class _ModuleWatcher(MetaPathFinder):
    """Calls ``callback(module)`` once ``name`` has been imported (see :func:`after_import`)."""

    marker = "mergekit_plugin_after_import"

    def __init__(self, name: str, callback):
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None or getattr(finder, "marker", None) == _MergeMethodsWatcher.marker:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _AfterExec(spec.loader, self.callback)
                return spec
        return None


def after_import(name: str, callback) -> None:
    """Call ``callback(module)`` when module ``name`` finishes importing (now, if it has)."""
    module = sys.modules.get(name)
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        callback(module)
        return
    sys.meta_path.insert(0, _ModuleWatcher(name, callback))


class _MergeMethodsWatcher(MetaPathFinder):
    marker = "mergekit_plugin_hook"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "marker", None) == self.marker:
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RunAfterExec(spec.loader)
                return spec
        return None


def _enabled_entry_points(group: str) -> list:
    from importlib.metadata import entry_points

    found = []
    for entry_point in entry_points(group=group):
        distribution = getattr(entry_point, "dist", None)
        dist_name = getattr(distribution, "name", "") or ""
        if _truthy(os.environ.get(_DISABLE_THIS)) and dist_name.replace("_", "-") == _THIS_DISTRIBUTION:
            continue
        found.append(entry_point)
    return found


def run_pre_merge_checks(merge_config) -> None:
    """Call every enabled ``mergekit.pre_merge`` entry point with the config. A plugin that
    cannot be loaded warns; a check that fails raises (that is what it is for)."""
    _run_group(PRE_MERGE_GROUP, merge_config)


def run_post_merge(merge_config, out_path, options) -> None:
    """Call every enabled ``mergekit.post_merge`` entry point after a merge was written."""
    _run_group(POST_MERGE_GROUP, merge_config, out_path, options)


def _run_group(group: str, *arguments) -> None:
    import warnings

    if _truthy(os.environ.get(_DISABLE_ALL)):
        return
    for entry_point in _enabled_entry_points(group):
        try:
            check = entry_point.load()
        except Exception as error:  # a broken plugin must never break mergekit itself
            warnings.warn(
                f"mergekit plugin hook {entry_point.name!r} ({entry_point.value}, group {group}) could "
                f"not be loaded and was skipped: {type(error).__name__}: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        check(*arguments)


def _wrap_run_merge(module) -> None:
    import functools

    original = getattr(module, "run_merge", None)
    if original is None or getattr(original, "_plugin_pre_merge", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config, out_path, *args, **kwargs):
        run_pre_merge_checks(merge_config)
        result = original(merge_config, out_path, *args, **kwargs)
        options = kwargs.get("options", args[0] if args else None)
        run_post_merge(merge_config, out_path, options)
        return result

    run_merge._plugin_pre_merge = True
    module.run_merge = run_merge


def install() -> None:
    if _truthy(os.environ.get(_DISABLE_ALL)):
        return
    state = _state()
    if any(getattr(f, "marker", None) == _MergeMethodsWatcher.marker for f in sys.meta_path):
        return
    if not state.get("pre_merge"):
        state["pre_merge"] = True
        after_import(RUN_MERGE_MODULE, _wrap_run_merge)
    if TARGET_MODULE in sys.modules:
        # Installed late (not from the .pth): mergekit is already imported.
        load_plugins()
        return
    finder = _MergeMethodsWatcher()
    state["finder"] = finder
    sys.meta_path.insert(0, finder)


install()
