"""The demo over several lab seeds: one build is one sample, so the lab's numbers are reported
as the mean and the spread (min–max) over independently built labs.

``run_seeds`` builds ``{lab_root}-seed{N}`` for every seed (cached by stamp), runs the demo's
declared configs on it into ``{workdir}/seed{N}`` and keeps that seed's ``results.json``; a seed
whose results exist for the same lab (stage stamps) and the same configs (names and bytes), with
no failed merge, is not run again, so an interrupted run resumes at the seed it stopped in
(inside a seed, learned masks are cached by content). ``aggregate`` turns the
per-seed results into one row per model or merge; ``render_markdown`` is the README's table.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

if TYPE_CHECKING:
    from mergekit_safety.lab.build import LabSettings

#: the figures aggregated over seeds (fractions, except retention which is a ratio)
METRICS = ("refusal_rate", "over_refusal_rate", "mean_expert_accuracy", "own_skill_accuracy", "retention")


def seed_lab_dir(lab_root: str, seed: int) -> str:
    return f"{lab_root.rstrip('/')}-seed{seed}"


def run_seeds(
    seeds: Sequence[int],
    workdir: str = "demo_out",
    lab_root: str = "lab",
    merges_dir: str = "merges",
    configs: Optional[List[str]] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    settings: Optional["LabSettings"] = None,
    eval_kwargs: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Run the demo once per seed; returns ``{"seeds", "configs", "per_seed": {seed: results}}``.
    ``settings``: the lab's settings apart from the seed (default: the default lab)."""
    from dataclasses import replace

    from mergekit_safety.lab.build import LabSettings
    from mergekit_safety.lab.demo import DEMO_CONFIGS

    log = log or (lambda msg: None)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    configs = list(configs or DEMO_CONFIGS)
    per_seed: Dict[int, Dict[str, Any]] = {}
    for k, seed in enumerate(seeds, start=1):
        per_seed[seed] = run_lab_configs(
            os.path.join(workdir, f"seed{seed}"), seed_lab_dir(lab_root, seed),
            replace(settings or LabSettings(), seed=seed), merges_dir, configs,
            label=f"seed {seed}: {k}/{len(seeds)}", progress=progress, log=log, eval_kwargs=eval_kwargs,
            record={"seed": seed})
    return {"seeds": list(seeds), "configs": configs, "per_seed": per_seed}


def run_lab_configs(
    out: str,
    lab_dir: str,
    lab_settings: "LabSettings",
    merges_dir: str,
    configs: List[str],
    label: str = "",
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    eval_kwargs: Optional[Dict[str, Any]] = None,
    record: Optional[Dict[str, Any]] = None,
    reuse_only: bool = False,
) -> Optional[Dict[str, Any]]:
    """Build (or reuse) the lab ``lab_dir`` with ``lab_settings`` and run the demo's ``configs``
    (file names in ``merges_dir``) on it into ``out``; returns ``out/results.json``'s content.
    Results for the same lab (its stage stamps) and the same configs (names and bytes), with no
    failed merge, are reused, so an interrupted run resumes here. ``record``: written into the
    results beside them (e.g. the seed). ``reuse_only``: return finished results or None, run nothing."""
    from mergekit_safety.engine.data import file_hash
    from mergekit_safety.lab.build import build_lab, plan_stages
    from mergekit_safety.lab.demo import run_demo

    log = log or (lambda msg: None)
    done = os.path.join(out, "results.json")
    previous = _read(done)
    # what the results depend on: the lab (its stage stamps) and the configs (their bytes)
    identity = {
        "configs": list(configs),
        "lab_stamps": {name: stage["stamp"] for name, stage in plan_stages(lab_settings.recipe())["models"].items()},
        "config_hashes": {c: file_hash(os.path.join(merges_dir, c)) for c in configs
                          if os.path.isfile(os.path.join(merges_dir, c))},
    }
    failed: List[str] = []
    if previous is not None and all(previous.get(key) == value for key, value in identity.items()):
        failed = [n for n, r in previous.get("models", {}).items() if "error" in r]
        if not failed:
            log(f"[{label}] results in {done}: reused")
            return previous
    if reuse_only:
        return None
    if failed:
        log(f"[{label}] {len(failed)} failed before ({', '.join(failed)}): run again")
    log(f"[{label}] lab {lab_dir}")
    build_lab(lab_dir, lab_settings, progress=progress, log=log)
    run_demo(workdir=out, lab_dir=lab_dir, merges_dir=merges_dir, build=False, progress=progress,
             log=log, configs=configs, eval_kwargs=eval_kwargs)
    result = _read(done)
    result.update(identity, **(record or {}))
    _write_json(done, result)  # marks the lab finished for the same configs
    return result


def aggregate(per_seed: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """One row per model or merge present in every seed: mean, min, max (and the values) of
    each metric. A merge that failed in any seed is listed under ``failed``."""
    seeds = sorted(per_seed)
    names: List[str] = []
    for seed in seeds:
        for name in per_seed[seed]["models"]:
            if name not in names:
                names.append(name)
    rows: Dict[str, Dict[str, Any]] = {}
    failed: Dict[str, Dict[int, str]] = {}
    for name in names:
        results = {s: per_seed[s]["models"].get(name) for s in seeds}
        errors = {s: (r or {}).get("error", "missing") for s, r in results.items() if r is None or "error" in r}
        if errors:
            failed[name] = errors
            continue
        row: Dict[str, Any] = {"merge_method": results[seeds[0]].get("merge_method", ""),
                               "kind": results[seeds[0]].get("kind", ""),
                               "single_expert": results[seeds[0]].get("single_expert")}
        for metric in METRICS:
            values = [results[s].get(metric) for s in seeds]
            if any(v is None for v in values):
                continue
            row[metric] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                           "values": dict(zip(seeds, values))}
            # each seed's 95 % Wilson interval, where the demo measured one (refusal, over-refusal)
            intervals = {s: results[s].get(metric.replace("_rate", "_interval")) for s in seeds}
            if metric.endswith("_rate") and all(intervals.values()):
                row[metric]["intervals"] = intervals
        row["plain"] = [s for s in seeds if per_seed[s].get("plain") == name]
        rows[name] = row
    return {"seeds": seeds, "plain": {s: per_seed[s].get("plain") for s in seeds}, "rows": rows, "failed": failed}


def _cell(stat: Optional[Dict[str, float]], percent: bool) -> str:
    if stat is None:
        return "-"
    f = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.2f}")
    return f"{f(stat['mean'])} ({f(stat['min'])}–{f(stat['max'])})"


def render_markdown(summary: Dict[str, Any]) -> str:
    """The table: mean (min–max over the seeds) of every metric."""
    seeds = summary["seeds"]
    head = ["model or merge", "method", "refusal %", "over-refusal %", "experts' skills % (one expert: its own skill)",
            "retention"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, row in summary["rows"].items():
        lines.append("| " + " | ".join([
            name, row["merge_method"] or row["kind"],
            _cell(row.get("refusal_rate"), True), _cell(row.get("over_refusal_rate"), True),
            (f"{row['single_expert']} " + _cell(row.get("own_skill_accuracy"), True)) if row.get("single_expert")
            else _cell(row.get("mean_expert_accuracy"), True),
            _cell(row.get("retention"), False),
        ]) + " |")
    for name, errors in summary["failed"].items():
        lines.append(f"| {name} | failed | " + "; ".join(f"seed {s}: {e}".replace("|", "/")[:120]
                                                          for s, e in errors.items()) + " | | | |")
    plain = ", ".join(f"seed {s}: `{p}`" for s, p in summary["plain"].items())
    lines.append("")
    lines.append(f"Mean (min–max) over lab seeds {', '.join(map(str, seeds))}; retention against each "
                 f"seed's best plain fusion ({plain}); for a one-expert merge, of that expert's own skill "
                 f"against the expert alone.")
    return "\n".join(lines)


def _read(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_text(path: str, text: str) -> None:
    """``text`` to ``path`` atomically (temporary file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2))


def write_summary(summary: Dict[str, Any], json_path: str) -> Dict[str, str]:
    """``json_path`` and the Markdown beside it (``.md``), both written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    _write_json(json_path, summary)
    md_path = os.path.splitext(json_path)[0] + ".md"
    _write_text(md_path, render_markdown(summary) + "\n")
    return {"json": json_path, "markdown": md_path}
