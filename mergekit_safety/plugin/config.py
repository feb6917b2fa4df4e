"""Merge YAML → the method and the locate request it implies (``mergekit-safety locate``).

The same request a merge kernel builds from its tensor groups
(:meth:`~mergekit_safety.fusion.method.LocatingFusionMethod.request`), so ``locate`` and a
plain ``mergekit-yaml`` run compute the same artifact.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

from mergekit_safety.fusion.artifacts import ArtifactError
from mergekit_safety.fusion.locate import LocateRequest, Locator
from mergekit_safety.plugin.specs import parameter_specs


def package_method(registered: Any) -> Optional[Any]:
    """This package's method behind a registered mergekit method (None for others)."""
    return getattr(registered, "method", None)


def request_from_config(config_path: str) -> Tuple[Any, LocateRequest]:
    """Parse a mergekit YAML into (method, LocateRequest), with scalar parameters only."""
    import yaml

    with open(config_path, "r", encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    return request_from_config_data(raw, config_path)


def request_from_config_data(raw: Mapping[str, Any], config_path: str = "merge config") -> Tuple[Any, LocateRequest]:
    from mergekit import merge_methods
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(raw)
    method = package_method(merge_methods.get(config.merge_method))
    if not isinstance(method, Locator):
        raise ArtifactError(
            f"{config_path}: merge_method {config.merge_method!r} has no locate step"
        )
    if not config.models or config.base_model is None:
        raise ArtifactError(
            f"{config_path}: locate needs a `models:` list and a `base_model:` (slices are not supported)"
        )
    base = config.base_model
    experts = tuple(m.model for m in config.models if m.model != base)
    specs = {p.name: p for p in parameter_specs(method.settings)}

    def scalar(name, setting, where):
        if isinstance(setting, (list, dict)) or hasattr(setting, "filter"):
            raise ArtifactError(
                f"{config_path}: {where} parameter {name!r} must be a single value for locate "
                "(per-layer lists and filters are not supported by data-driven methods)"
            )
        return specs[name].validate(setting) if name in specs else setting

    parameters = {}
    for name, spec in specs.items():
        if spec.scope.value == "shared":
            value = (config.parameters or {}).get(name)
            parameters[name] = spec.default if value is None else scalar(name, value, "global")
    expert_parameters = {}
    for model in config.models:
        if model.model == base:
            continue
        values = {}
        for name, spec in specs.items():
            if spec.scope.value != "shared":
                value = (model.parameters or {}).get(name, (config.parameters or {}).get(name))
                values[name] = spec.default if value is None else scalar(name, value, f"{model.model}")
        expert_parameters[model.model] = values
    models = {name: parameters[name] for name in method.model_parameters if parameters.get(name)}
    return method, LocateRequest(
        method=method.name,
        base=base,
        experts=experts,
        parameters=parameters,
        expert_parameters=expert_parameters,
        models=models,
    )


def locate_config(config_path: str, force: bool = False) -> str:
    method, request = request_from_config(config_path)
    return method.locate(request, force=force)
