"""The results table: ``WORK/results.json`` (one entry per model) and ``WORK/results.md``."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List


def _pct(r: Dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def _retention(entry: Dict[str, Any]) -> str:
    value = entry.get("retention")
    if value is None or entry["method"] in ("original", "aligned") or entry["method"].startswith("expert"):
        return "-"
    return f"{value:.2f}" + (f" ({entry['own_skill']})" if entry.get("own_skill") else "")


def write_report(work: str, eval_dir: str, skills: List[str], fusions: Dict[str, Any], settings: Dict[str, Any],
                 times: Dict[str, Any]) -> str:
    found: Dict[str, Dict[str, Any]] = {}
    for file in sorted(os.listdir(eval_dir)):
        if file.endswith(".json"):
            with open(os.path.join(eval_dir, file)) as handle:
                r = json.load(handle)
            found[r["name"]] = r
    # original, aligned, experts, then the fusions in the order they were configured
    rank = {n: i for i, n in enumerate(["smollm2-135m-instruct", "aligned", *[f"expert_{k}" for k in skills], *fusions])}
    results = {n: found[n] for n in sorted(found, key=lambda n: (rank.get(n, len(rank)), n))}

    def mean_skill(r):
        return sum(r["accuracy"][k]["rate"] for k in skills) / len(skills)

    aligned = results.get("aligned")
    plain = [n for n in fusions if n in results]
    best = max(plain, key=lambda n: mean_skill(results[n]), default=None)
    entries = []
    for name, r in results.items():
        method = ("original" if name.startswith("smollm2") else "aligned" if name == "aligned"
                  else ("expert (full)" if settings.get("variant") == "full" else "expert (LoRA)") if name.startswith("expert_")
                  else r.get("method") or fusions.get(name, {}).get("method", "?"))
        entry = {
            "name": name, "method": method, "control": bool(r.get("control", False)),
            "refusal_rate": r["refusal"]["rate"], "refusal_ci95": r["refusal"]["ci95"], "refusal_n": r["refusal"]["n"],
            "over_refusal_rate": r["over_refusal"]["rate"], "over_refusal_ci95": r["over_refusal"]["ci95"],
            "over_refusal_n": r["over_refusal"]["n"],
            "accuracy": {k: v["rate"] for k, v in r["accuracy"].items()},
            "accuracy_ci95": {k: v["ci95"] for k, v in r["accuracy"].items()},
            "accuracy_n": {k: v["n"] for k, v in r["accuracy"].items()},
            "mean_expert_skill": round(mean_skill(r), 4),
            "judge": r.get("judge"), "eval_seconds": r.get("eval_seconds"),
        }
        if name in fusions:
            entry["fusion"] = fusions[name]
            entry["config"] = os.path.join(work, "fusions", f"{name}.yml")
        if "parameters" in r:  # a safety merge: its YAML is WORK/safety/NAME.yml
            entry["config"] = r.get("config") or os.path.join(work, "safety", f"{name}.yml")
        if entry.get("config"):  # the reproducing command (the testbed runs it with its LoRA cache)
            entry["command"] = (f"MERGEKIT_SAFETY_CACHE={work}/cache mergekit-yaml {entry['config']} OUT "
                                f"--lora-merge-cache {work}/lora_cache")
        if "parameters" in r:  # a safety merge: its settings, experts, timing and artifacts
            entry["settings"] = r["parameters"]
            entry["experts"] = r.get("experts")
            entry["merge_seconds"] = r.get("merge_seconds")
            entry["peak_rss_mb"] = r.get("peak_rss_mb")
            entry["artifacts"] = [{"file": os.path.basename(a["path"]), "metadata": a["metadata"]}
                                  for a in r.get("artifacts", [])]
        own = name[len("expert_"):] if name.startswith("expert_") else None
        if own in r["accuracy"] and aligned is not None:
            entry["own_skill_gain_over_aligned"] = round(r["accuracy"][own]["rate"] - aligned["accuracy"][own]["rate"], 4)
        single = r.get("experts") if isinstance(r.get("experts"), str) and r.get("experts") != "all" else None
        if single and aligned is not None and f"expert_{single}" in results:
            # one expert: retention of its own skill, against the expert itself
            expert = results[f"expert_{single}"]["accuracy"][single]["rate"]
            base = aligned["accuracy"][single]["rate"]
            entry["own_skill"] = single
            entry["own_skill_share_of_expert"] = round(r["accuracy"][single]["rate"] / expert, 4) if expert else None
            entry["retention"] = round((r["accuracy"][single]["rate"] - base) / (expert - base), 4) if expert > base else None
        elif aligned is not None:
            entry["gain_over_aligned"] = round(mean_skill(r) - mean_skill(aligned), 4)
            if best is not None:
                gap = mean_skill(results[best]) - mean_skill(aligned)
                entry["retention"] = round((mean_skill(r) - mean_skill(aligned)) / gap, 4) if gap > 0 else None
        entries.append(entry)
    out = {"settings": settings, "best_plain_fusion": best, "entries": entries,
           "stage_seconds": {k: v.get("seconds") for k, v in times.items()},
           "item_seconds": {k: {i: e.get("seconds") for i, e in v.get("items", {}).items()} for k, v in times.items()}}
    with open(os.path.join(work, "results.json") + ".tmp", "w") as handle:
        json.dump(out, handle, indent=2)
    os.replace(os.path.join(work, "results.json") + ".tmp", os.path.join(work, "results.json"))
    head = ["model", f"refusal % (n={aligned['refusal']['n'] if aligned else '?'})", "over-refusal %",
            *[f"{k} %" for k in skills], "copy %", "mean skills", "gain vs aligned (mean / own skill)", "retention", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    by_name = {e["name"]: e for e in entries}
    for name, r in results.items():
        gain = f"{100 * (mean_skill(r) - mean_skill(aligned)):+.1f}" if aligned else ""
        own = name[len("expert_"):] if name.startswith("expert_") else None
        if aligned and own in r["accuracy"]:
            gain += f" / {100 * (r['accuracy'][own]['rate'] - aligned['accuracy'][own]['rate']):+.0f}"
        lines.append("| " + " | ".join([
            name + (" (best plain)" if name == best else ""), _pct(r["refusal"]), _pct(r["over_refusal"]),
            *[_pct(r["accuracy"][k]) for k in skills],
            _pct(r["accuracy"]["copy"]) if "copy" in r["accuracy"] else "-",
            f"{100 * mean_skill(r):.1f}", gain, _retention(by_name[name]), f"{r.get('eval_seconds', 0):.0f}",
        ]) + " |")
    table = "\n".join(lines) + "\n\nRates in % with 95 % Wilson intervals; n per skill in results.json.\n"
    with open(os.path.join(work, "results.md"), "w") as handle:
        handle.write(table)
    with open(os.path.join(work, "summary.md"), "w") as handle:
        handle.write(summary_table(entries, best))
    return table


def summary_table(entries: List[Dict[str, Any]], best: Any) -> str:
    """One row per model or method, its random control beside it (the README's table)."""
    by_name = {e["name"]: e for e in entries}

    def cell(e, key):
        lo, hi = e[key + "_ci95"]
        return f"{100 * e[key + '_rate']:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"

    def skills(e):
        if e.get("own_skill"):
            own = e["own_skill"]
            return f"{own} {100 * e['accuracy'][own]:.0f} (expert {100 * by_name['expert_' + own]['accuracy'][own]:.0f})"
        return f"{100 * e['mean_expert_skill']:.1f}"

    head = ["model or merge", "method", "refusal %", "over-refusal %", "experts' skills %", "retention",
            "random control: refusal % / retention"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * 5) + "|"]
    for e in entries:
        if e["control"] or e["name"].startswith("expert_") or e["name"] == "smollm2-135m-instruct":
            continue
        control = by_name.get(e["name"] + "_random")
        retention = "-" if e["method"] == "aligned" or e.get("retention") is None else f"{e['retention']:.2f}"
        versus = (f"{cell(control, 'refusal')} / {control['retention']:.2f}" if control and control.get("retention") is not None
                  else "-")
        name = e["name"] + (" (best plain fusion)" if e["name"] == best else "")
        lines.append("| " + " | ".join([name, e["method"], cell(e, "refusal"), cell(e, "over_refusal"), skills(e),
                                         retention, versus]) + " |")
    return "\n".join(lines) + "\n"


#: (label, experts, lab row, its lab random control, real-testbed row); a real row's random
#: control is ``row + "_random"``; None: not run there
METHOD_ROWS = [
    ("SOMF (task arithmetic)", "3", "multi_task_safe", "somf_random", "somf"),
    ("SOMF (TIES)", "3", "somf_ties", None, None),
    ("SSAH", "3", "ssah", "ssah_random", "ssah"),
    ("Antidote", "3", "antidote", "antidote_random", "antidote"),
    ("RESTA", "3", "resta", "resta_random", "resta"),
    ("Safe LoRA", "3", "safe_lora", "safe_lora_random", "safe_lora"),
    ("SafeMERGE", "3", "safemerge", "safemerge_random", "safemerge"),
    ("SOMF", "1", "somf_single", "somf_single_random", "somf_single_json"),
    ("SSAH", "1", "ssah_single", "ssah_single_random", "ssah_single_json"),
    ("Antidote", "1", "antidote_single", "antidote_single_random", "antidote_single_json"),
    ("RESTA", "1", "resta_single", "resta_single_random", "resta_single_json"),
    ("Safe LoRA", "1", "safe_lora_single", "safe_lora_single_random", "safe_lora_single_json"),
    ("SafeMERGE", "1", "safemerge_single", "safemerge_single_random", "safemerge_single_json"),
]


def methods_table(lab: Dict[str, Any], real: Dict[str, Any], merge_ratios: Dict[str, float], seed: int = 0) -> str:
    """Every method on the lab and on the real testbed, side by side (issue 17's table).

    ``lab``: ``benchmarks/results/lab_seeds.json`` (seed ``seed`` with its 95 % Wilson interval,
    and the range over every seed); ``real``: ``real_model.json``; ``merge_ratios``: merge time
    over plain task arithmetic in one run on the real testbed, by row name."""
    rows = lab["rows"]
    by_name = {e["name"]: e for e in real["entries"]}
    key = str(seed) if str(seed) in next(iter(rows.values()))["refusal_rate"]["values"] else seed

    def lab_rate(name, metric):
        stat = (rows.get(name) or {}).get(metric)
        if not stat:
            return "-"
        value, (lo, hi) = stat["values"][key], stat["intervals"][key]
        return (f"{100 * value:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] "
                f"({100 * stat['min']:.1f}–{100 * stat['max']:.1f})")

    def lab_retention(name):
        stat = (rows.get(name) or {}).get("retention")
        return "-" if not stat else f"{stat['values'][key]:.2f} ({stat['min']:.2f}–{stat['max']:.2f})"

    def real_rate(name, metric):
        e = by_name.get(name)
        if e is None:
            return "not run"
        lo, hi = e[metric + "_ci95"]
        return f"{100 * e[metric + '_rate']:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"

    def real_retention(name):
        e = by_name.get(name)
        return "not run" if e is None or e.get("retention") is None else f"{e['retention']:.2f}"

    head = ["method", "experts", "lab: refusal %", "lab: over-refusal %", "lab: retention", "lab control: refusal %",
            "real: refusal %", "real: over-refusal %", "real: retention", "real control: refusal %",
            "real: merge time × task arithmetic"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for label, experts, lab_name, lab_control, real_name in METHOD_ROWS:
        ratio = merge_ratios.get(real_name or "")
        lines.append("| " + " | ".join([
            label, experts,
            lab_rate(lab_name, "refusal_rate"), lab_rate(lab_name, "over_refusal_rate"), lab_retention(lab_name),
            lab_rate(lab_control, "refusal_rate") if lab_control else "not run",
            real_rate(real_name, "refusal") if real_name else "not run",
            real_rate(real_name, "over_refusal") if real_name else "not run",
            real_retention(real_name) if real_name else "not run",
            real_rate(real_name + "_random", "refusal") if real_name else "not run",
            "-" if ratio is None else f"{ratio:.2f}",
        ]) + " |")
    return "\n".join(lines) + "\n"
