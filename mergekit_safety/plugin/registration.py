"""Registration of this package's merge methods in mergekit's registry.

Called by the plugin hook (entry point ``mergekit.merge_methods``) right after mergekit's
``merge_methods`` package is imported, in every process that plans or runs a merge.
Idempotent: a method already registered under its name by this package is left alone.
"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import List

_deferral_lock = threading.Lock()


def package_methods() -> List:
    """Fresh mergekit methods for every method this package provides."""
    from mergekit_safety.methods import all_methods
    from mergekit_safety.plugin.adapter import MergekitMethod

    return [MergekitMethod(method) for method in all_methods()]


def _own_import_in_progress() -> bool:
    """True while one of this package's modules is still executing its import.

    That happens when our own code is the first to import mergekit (``import
    mergekit_safety.fusion.kernel`` → mergekit → plugin hook): importing the methods now would see
    half-initialised modules.
    """
    for name, module in list(sys.modules.items()):
        if name.startswith("mergekit_safety.") and name != __name__:
            spec = getattr(module, "__spec__", None)
            if spec is not None and getattr(spec, "_initializing", False):
                return True
    return False


def _defer_until_lookup() -> None:
    """Register on the first lookup instead (by then our imports have finished)."""
    import mergekit.merge_methods as package
    from mergekit.merge_methods import registry

    originals = {name: getattr(registry, name) for name in ("get", "registered_methods")}
    done = []

    def complete() -> None:
        with _deferral_lock:
            if done:
                return
            done.append(True)
            for name, function in originals.items():
                setattr(registry, name, function)
                setattr(package, name, function)
        register_methods()

    def make(name):
        def lookup(*args, **kwargs):
            complete()
            return originals[name](*args, **kwargs)

        lookup.__wrapped__ = originals[name]
        return lookup

    for name in originals:
        setattr(registry, name, make(name))
        setattr(package, name, make(name))


def register_methods() -> List[str]:
    """Register each method not yet registered; return the names registered now."""
    from mergekit.merge_methods import registry

    if _own_import_in_progress():
        _defer_until_lookup()
        return []
    registered = []
    for method in package_methods():
        name = method.spec.name
        existing = registry._METHODS.get(name)  # the registry offers no "contains"
        if existing is not None:
            if type(existing).__module__.startswith("mergekit_safety"):
                continue  # registered earlier in this process: idempotent
            warnings.warn(
                f"mergekit-safety: a merge method named {name!r} is already registered by "
                f"{type(existing).__module__}; keeping that one",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        registry.register(method)
        registered.append(name)
    return registered


def describe_methods() -> str:
    """Human-readable table of methods, parameters (type, default, meaning) and papers."""
    from mergekit.merge_methods.base import MISSING, ParameterScope

    lines = []
    for method in package_methods():
        spec = method.spec
        lines.append(f"{spec.name} — {spec.pretty_name}")
        summary = getattr(method, "summary", "")
        if summary:
            lines.append(f"  {summary}")
        if spec.reference_url:
            lines.append(f"  paper: {spec.reference_url}")
        lines.append("  parameters:")
        for parameter in spec.parameters:
            default = "required" if parameter.default is MISSING else repr(parameter.default)
            scope = "per model" if parameter.scope != ParameterScope.SHARED else "global"
            type_name = _type_name(parameter.value_type)
            lines.append(f"    {parameter.name} ({type_name}, {scope}, default {default})")
            if parameter.description:
                lines.append(f"        {parameter.description}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _type_name(value_type) -> str:
    from typing import get_args, get_origin

    from typing_extensions import Annotated, Literal

    origin = get_origin(value_type)
    if origin is Annotated:
        inner, *constraints = get_args(value_type)
        bounds = []
        for constraint in constraints:
            for item in getattr(constraint, "metadata", [constraint]):
                for attribute, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                    if hasattr(item, attribute):
                        bounds.append(f"{symbol}{getattr(item, attribute)}")
        return _type_name(inner) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin is Literal:
        return "|".join(str(v) for v in get_args(value_type))
    if origin is not None and type(None) in get_args(value_type):
        inner = [a for a in get_args(value_type) if a is not type(None)]
        return "optional " + _type_name(inner[0])
    return getattr(value_type, "__name__", str(value_type))
