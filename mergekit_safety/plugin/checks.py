"""`mergekit-safety check`: validate a merge config before any tensor is loaded.

mergekit silently ignores unknown parameter names (a typo like ``mask_flie`` passes) and a
global-only parameter written under one model. A merge of several large models takes hours,
so this module finds, in one pass and with one line per problem:

* unknown or misspelled parameters (with the closest known name), at every level;
* global-only parameters written under a model (mergekit ignores them there);
* invalid or out-of-range values;
* missing models, artifacts and calibration data files, and malformed data files;
* an artifact computed for other models, data or settings;
* experts whose tensor names or shapes differ from the base model's.

Our methods run the same checks at plan time (see :func:`check_at_plan_time`).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_safety.engine.checkpoint import header_shapes
from mergekit_safety.fusion.artifacts import ArtifactError
from mergekit_safety.fusion.models import local_directory


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    message: str
    line: Optional[int] = None
    warning: bool = False  # reported, but the merge may go on

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {'warning: ' if self.warning else ''}{self.message}"


class ConfigCheckError(ArtifactError):
    """Problems found in a merge config (an ArtifactError, because stale or foreign
    artifacts and missing data are among them and callers catch that type)."""

    def __init__(self, source: str, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = "\n".join(p.format(source) for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in merge config:\n{lines}")


# --------------------------------------------------------------------------- YAML lines


def _line_map(text: str) -> Dict[Tuple, int]:
    """Map key paths (('parameters', 'lambda'), ('models', 0, 'parameters', 'weight'), …)
    to 1-based line numbers."""
    import yaml

    lines: Dict[Tuple, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (key.value,)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[path + (index,)] = item.start_mark.line + 1
                walk(item, path + (index,))

    if root is not None:
        walk(root, ())
    return lines


def tied_names(shapes: Mapping[str, Tuple[int, ...]]) -> set:
    """Tensors a checkpoint may omit because they are tied to another (lm_head → embeddings),
    as mergekit's own methods read them."""
    if "lm_head.weight" not in shapes and any(n.endswith("embed_tokens.weight") for n in shapes):
        return {"lm_head.weight"}
    return set()


def safetensors_shapes(directory: str) -> Dict[str, Tuple[int, ...]]:
    """Tensor name → shape of a model directory, from the safetensors headers only."""
    return header_shapes(directory)


# --------------------------------------------------------------------------- the check


def _setting_values(value: Any) -> List[Any]:
    """The scalar values inside a mergekit parameter setting (scalar, list, or filters)."""
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, dict) and "value" in item:
                out.extend(_setting_values(item["value"]))
            else:
                out.append(item)
        return out
    return [value]


def check_config_data(raw: Mapping[str, Any], lines: Mapping[Tuple, int] | None = None) -> List[Problem]:
    """Check a parsed YAML mapping; return the problems found (empty = fine)."""
    from mergekit import merge_methods

    from mergekit_safety.plugin.config import package_method

    lines = lines or {}
    problems: List[Problem] = []

    def add(message: str, path: Tuple = (), warning: bool = False):
        line = None
        for cut in range(len(path), -1, -1):
            if path[:cut] in lines:
                line = lines[path[:cut]]
                break
        problems.append(Problem(message, line, warning))

    if not isinstance(raw, Mapping):
        return [Problem("the file is not a YAML mapping (expected merge_method:, models:, …)")]
    method_name = raw.get("merge_method")
    try:
        method = merge_methods.get(method_name)
    except RuntimeError:
        known = [m.spec.name for m in merge_methods.registered_methods()]
        close = difflib.get_close_matches(str(method_name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [Problem(f"unknown merge_method {method_name!r}{hint}", lines.get(("merge_method",)))]
    ours = package_method(method) is not None
    from mergekit_safety.fusion.locate import Locator

    locating = isinstance(package_method(method), Locator)
    specs = {p.name: p for p in method.spec.parameters}
    shared = {n for n, p in specs.items() if p.scope.value == "shared"}

    def check_parameters(parameters: Any, path: Tuple, under_model: Optional[str]):
        if parameters is None:
            return
        if not isinstance(parameters, Mapping):
            add("parameters must be a mapping of name: value", path)
            return
        for name, value in parameters.items():
            where = path + (name,)
            if name not in specs:
                close = difflib.get_close_matches(name, list(specs), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                add(
                    f"unknown parameter {name!r} for {method_name} (mergekit would silently "
                    f"ignore it){hint}",
                    where,
                )
                continue
            if under_model is not None and name in shared:
                add(
                    f"parameter {name!r} is global for {method_name}: written under model "
                    f"{under_model} it is silently ignored by mergekit — move it to the top-level "
                    "`parameters:`",
                    where,
                )
            if locating and isinstance(value, list):
                add(
                    f"parameter {name!r} of {method_name} must be a single value (per-layer lists "
                    "and filters are not supported by methods that compute an artifact)",
                    where,
                )
                continue
            for scalar in _setting_values(value):
                if isinstance(scalar, float) and not math.isfinite(scalar):
                    add(f"parameter {name!r}: {scalar!r} is not a finite number", where)
                    continue
                try:
                    specs[name].validate(scalar)
                except Exception as error:  # pydantic / our named errors (already say it all)
                    text = _short(error)
                    add(text if text.startswith("merge parameter") else
                        f"parameter {name!r}: invalid value {scalar!r} ({text})", where)

    check_parameters(raw.get("parameters"), ("parameters",), None)
    models = raw.get("models") or []
    for index, model in enumerate(models):
        if isinstance(model, Mapping):
            check_parameters(model.get("parameters"), ("models", index, "parameters"), str(model.get("model")))
    for s_index, output_slice in enumerate(raw.get("slices") or []):
        check_parameters(output_slice.get("parameters"), ("slices", s_index, "parameters"), None)
        for i_index, source in enumerate(output_slice.get("sources") or []):
            check_parameters(
                source.get("parameters"),
                ("slices", s_index, "sources", i_index, "parameters"),
                str(source.get("model")),
            )

    if not ours:
        # mergekit's own methods may name hub repositories; a reference written as a path
        # (./x, ../x, /x) must exist, or the merge fails after loading everything else
        for path, ref in [(("base_model",), raw.get("base_model"))] + [
            (("models", i, "model"), m.get("model")) for i, m in enumerate(models) if isinstance(m, Mapping)
        ]:
            directory = local_directory(ref)
            if directory.startswith(("./", "../", "/")) and not os.path.isdir(directory):
                add(missing_model_message(ref), path)
        return problems

    base = raw.get("base_model")
    if not base:
        add(f"{method_name} needs a base_model: the safety-aligned model the task vectors are taken against")
        return problems

    # models exist locally, and have the base model's tensor names and shapes
    model_refs = [m.get("model") for m in models if isinstance(m, Mapping)]
    if models and all(str(ref) == str(base) for ref in model_refs):
        add(f"the only model is the base_model {base}: the merge just copies it (add the fine-tuned experts under `models:`)", ("models",), warning=True)
    base_shapes = _model_shapes(str(base), ("base_model",), add)
    for index, ref in enumerate(model_refs):
        if ref is None or str(ref) == str(base):
            continue
        shapes = _model_shapes(str(ref), ("models", index, "model"), add)
        if base_shapes is None or shapes is None:
            continue
        missing = sorted(set(base_shapes) - set(shapes) - tied_names(shapes))
        if missing:
            add(f"model {ref} lacks {len(missing)} tensor(s) of the base model, e.g. {missing[0]}", ("models", index))
        vocabulary_aligned = bool(raw.get("tokenizer") or raw.get("tokenizer_source"))
        for name in sorted(set(base_shapes) & set(shapes)):
            vocabulary_tensor = "embed" in name or "lm_head" in name
            if vocabulary_tensor and vocabulary_aligned:
                continue  # mergekit re-aligns the vocabulary axis itself
            if base_shapes[name] != shapes[name]:
                hint = (
                    " (a vocabulary difference: align it with `tokenizer: {source: base}`)"
                    if "embed" in name or "lm_head" in name
                    else ""
                )
                add(
                    f"model {ref}: tensor {name} has shape {list(shapes[name])}, base has "
                    f"{list(base_shapes[name])}{hint}",
                    ("models", index),
                )
                break

    # further models named by parameters (e.g. an unaligned model): local, same tensors
    global_parameters = raw.get("parameters") or {}
    for name in package_method(method).settings.model_fields_():
        ref = global_parameters.get(name)
        if not ref or not isinstance(ref, str):
            continue
        shapes = _model_shapes(ref, ("parameters", name), add)
        if base_shapes is None or shapes is None:
            continue
        missing = sorted(set(base_shapes) - set(shapes) - tied_names(shapes))
        differ = sorted(n for n in set(base_shapes) & set(shapes) if base_shapes[n] != shapes[n])
        if missing:
            add(f"{name}: model {ref} lacks {len(missing)} tensor(s) of the base model, e.g. {missing[0]}", ("parameters", name))
        elif differ:
            add(
                f"{name}: model {ref}: tensor {differ[0]} has shape {list(shapes[differ[0]])}, base has "
                f"{list(base_shapes[differ[0]])}",
                ("parameters", name),
            )

    if any(not p.warning for p in problems):
        return problems
    problems.extend(_check_files_and_artifact(method, raw, add))
    return problems


def missing_model_message(ref: Any) -> str:
    """One wording for a model that is not a local folder, with the likely fix."""
    directory = local_directory(ref)
    message = (f"model {ref!r} is not a local directory (resolved from the working directory "
               f"{os.getcwd()}); mergekit-safety never downloads models")
    parts = os.path.normpath(directory).split(os.sep)
    if parts and parts[0] == "lab" and not os.path.isdir("lab"):
        message += " — the safety lab is not built here: run `mergekit-safety lab` (from the repository root) first"
    return message


def _model_shapes(ref: str, path: Tuple, add) -> Optional[Dict[str, Tuple[int, ...]]]:
    directory = local_directory(ref)
    if not os.path.isdir(directory):
        add(missing_model_message(ref), path)
        return None
    try:
        shapes = safetensors_shapes(directory)
    except Exception as error:
        add(f"model {ref}: cannot read its safetensors headers ({_short(error)})", path)
        return None
    if not shapes:
        add(f"model {ref}: no .safetensors weights found in {directory}", path)
        return None
    return shapes


def _check_files_and_artifact(method, raw: Mapping[str, Any], add) -> List[Problem]:
    from mergekit_safety.fusion.artifacts import open_artifact
    from mergekit_safety.fusion.locate import Locator
    from mergekit_safety.fusion.settings import AUTO
    from mergekit_safety.plugin.config import package_method, request_from_config_data

    method = package_method(method)
    parameters = raw.get("parameters") or {}
    mask = parameters.get("mask")
    if isinstance(method, Locator):
        for name in method.data_parameters:
            path = parameters.get(name)
            if path == AUTO:
                source = method.settings.parameter(name).auto_from
                if not source:
                    add(f"{name}: 'auto' is not supported (give a data file)", ("parameters", name))
                elif not parameters.get(source):
                    add(f"{name}: auto needs {source} (a JSONL of prompts to build it from)", ("parameters", name))
                continue
            if not path:
                continue
            if not os.path.isfile(str(path)):
                add(f"{name}: data file {path!r} not found (resolved from {os.getcwd()})", ("parameters", name))
                continue
            try:
                from mergekit_safety.engine.data import read_jsonl

                keys = method.settings.parameter(name).keys
                read_jsonl(str(path), keys, nonempty=keys)
            except Exception as error:
                add(f"{name}: {_short(error)}", ("parameters", name))
        if mask and mask != AUTO and os.path.exists(str(mask)):
            try:
                _, request = request_from_config_data(raw)
                method.check_current(str(mask), method.artifact_record(request))
            except ArtifactError as error:
                add(str(error), ("parameters", "mask"))
        elif mask and mask != AUTO and not method.can_locate({**method.settings.defaults(), **parameters}):
            add(
                f"mask artifact {mask!r} not found (resolved from {os.getcwd()}) and no data "
                f"({', '.join(method.data_parameters)}) to compute it: the merge would run WITHOUT "
                "safety restoration; give the data or the path of an existing artifact",
                ("parameters", "mask"),
            )
        return []
    if mask:
        if not os.path.exists(str(mask)):
            add(f"mask artifact {mask!r} not found (resolved from {os.getcwd()})", ("parameters", "mask"))
            return []
        try:
            artifact = open_artifact(str(mask))
            method.check_roles(artifact)
            experts = [m["model"] for m in raw.get("models") or [] if str(m.get("model")) != str(raw["base_model"])]
            artifact.check_models(str(raw["base_model"]), experts)
        except ArtifactError as error:
            add(str(error), ("parameters", "mask"))
    return []


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def check_config_file(path: str) -> List[Problem]:
    import yaml

    try:
        with open(path, "r", encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        return [Problem(f"cannot read: {error}")]
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        return [Problem(f"invalid YAML: {getattr(error, 'problem', error)}", mark.line + 1 if mark else None)]
    problems = check_config_data(raw, _line_map(text))
    if any(not p.warning for p in problems):
        return problems
    # finally, mergekit's own validation of the config structure
    try:
        from mergekit.config import MergeConfiguration

        MergeConfiguration.model_validate(raw)
    except Exception as error:
        return problems + [Problem(f"mergekit rejects the config: {_short(error)}")]
    return problems


# --------------------------------------------------------------------------- plan time

# configs already checked, by id — with the config itself kept alive, so that a freed
# config's id reused by a new one can never skip the new one's check
_checked_configs: Dict[int, Any] = {}


def config_as_raw(config: Any) -> Dict[str, Any]:
    """A MergeConfiguration as the YAML mapping it came from (``models:`` read back from the
    modules/slices mergekit normalises it into while planning)."""
    raw = config.model_dump(mode="json", exclude_none=True)
    if not raw.get("models") and raw.get("modules"):
        module = next(iter(raw["modules"].values()))
        slices = module.get("slices") or []
        if len(slices) == 1:
            raw = {k: v for k, v in raw.items() if k != "modules"}
            raw["models"] = [
                {"model": s["model"], "parameters": s.get("parameters") or {}}
                for s in slices[0].get("sources") or []
            ]
    return raw


def pre_merge_check(config: Any) -> None:
    """The plan-time check, run by the plugin hook before mergekit's ``run_merge`` starts
    (entry point ``mergekit.pre_merge``): for this package's methods only."""
    from mergekit import merge_methods

    from mergekit_safety.plugin.config import package_method

    try:
        method = merge_methods.get(getattr(config, "merge_method", None))
    except RuntimeError:
        return  # an unknown method: mergekit says so itself
    if package_method(method) is not None:
        check_at_plan_time(config)
        prepare_artifact(package_method(method), config)


def prepare_artifact(method: Any, config: Any) -> None:
    """Compute a missing artifact before mergekit's executor starts: announced in one line
    (what, why, how long; how to do it ahead), shown with its own progress bar — instead of
    inside the first tensor task, where mergekit's outer bar would sit still and show an
    absurd ETA."""
    from mergekit_safety.fusion.locate import Locator
    from mergekit_safety.plugin.config import request_from_config_data

    if not isinstance(method, Locator):
        return
    try:
        _, request = request_from_config_data(config_as_raw(config))
    except ArtifactError:
        return  # slices, per-layer lists: the kernel reports these itself
    parameters = {**method.settings.defaults(), **request.parameters}
    if not method.wants_artifact(parameters):
        return
    path = method.artifact_path(method.resolved(request))
    if os.path.exists(path):
        return  # validated (or refused as stale) by the kernel
    logger.warning(
        "%s: %s before the merge starts; written to %s and reused by later merges with the same "
        "models, data and settings (`mergekit-safety locate CONFIG` does this step ahead)",
        method.name, method.locate_description(method.resolved(request)), path,
    )
    method.locate(request)


def check_at_plan_time(config: Any) -> None:
    """Run the same checks on the MergeConfiguration mergekit is planning; raise on problems."""
    key = id(config)
    if _checked_configs.get(key) is config:
        return
    if len(_checked_configs) > 64:  # a long-lived process merging many configs
        _checked_configs.clear()
    _checked_configs[key] = config
    problems = check_config_data(config_as_raw(config))
    for problem in problems:
        if problem.warning:
            logger.warning("merge config: %s", problem.message)
    errors = [p for p in problems if not p.warning]
    if errors:
        raise ConfigCheckError("merge config", errors)
