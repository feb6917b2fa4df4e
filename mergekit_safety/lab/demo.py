"""``mergekit-safety demo``: build the lab, run the declared ``merges/`` configs, evaluate, compare.

For each YAML the merge runs in-process through mergekit (``MergeConfiguration`` +
``run_merge``); this package's methods are registered by its import hook, so YAMLs for them
run exactly like under ``mergekit-yaml``. A failing merge is recorded in the table and the
demo goes on. Then aligned, every expert and every merge are evaluated on the lab's held-out
sets, and a Markdown table, a JSON file and a safety-vs-utility scatter plot are written.

Retention (utility kept from the fusion's gain), over the experts' skills:
``(acc - acc_aligned) / (acc_plain - acc_aligned)`` with *plain* the best (highest mean
expert-skill accuracy) plain mergekit fusion among ``task_arithmetic`` / ``ties``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

PLAIN_METHODS = ("task_arithmetic", "ties")


def _rewrite_lab_paths(obj: Any, lab_dir: str) -> Any:
    """Point ``lab/...`` and ``./lab/...`` strings of a merge config at ``lab_dir``."""
    if isinstance(obj, dict):
        return {k: _rewrite_lab_paths(v, lab_dir) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rewrite_lab_paths(v, lab_dir) for v in obj]
    if isinstance(obj, str):
        for prefix in ("./lab/", "lab/"):
            if obj.startswith(prefix):
                return os.path.join(lab_dir, obj[len(prefix):])
        if obj in ("lab", "./lab"):
            return lab_dir
    return obj


def load_merge_config(path: str, lab_dir: Optional[str] = None) -> Dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a mergekit configuration (expected a mapping)")
    if lab_dir is not None and os.path.abspath(lab_dir) != os.path.abspath("lab"):
        data = _rewrite_lab_paths(data, lab_dir)
    return data


def run_yaml_merge(config: Dict[str, Any], out_path: str) -> None:
    """Run one mergekit merge in-process (CPU, tokenizer copied, no model card noise)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    merge_config = MergeConfiguration.model_validate(config)
    tmp = out_path.rstrip("/\\") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    # no model card: mergekit's card writer asks the Hugging Face hub about every two-part
    # relative path ("lab/aligned"), which fails offline
    from transformers.utils import logging as hf_logging

    # transformers' notices about how mergekit calls it (e.g. `torch_dtype` deprecated) are not
    # the user's to act on: errors only while mergekit runs
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        run_merge(merge_config, tmp, options=MergeOptions(copy_tokenizer=True, quiet=True, lazy_unpickle=False,
                                                          write_model_card=False))
    finally:
        hf_logging.set_verbosity(verbosity)
    shutil.rmtree(out_path, ignore_errors=True)
    os.replace(tmp, out_path)


def retention(acc: float, acc_aligned: float, acc_plain: float) -> Optional[float]:
    gain = acc_plain - acc_aligned
    if abs(gain) < 1e-9:
        return None
    return (acc - acc_aligned) / gain


#: the configs the demo runs (in this order): a declared set, so a user's own YAML dropped into
#: merges/ is not swept into the comparison
DEMO_CONFIGS = (
    # three experts
    "task_arithmetic.yml", "ties.yml",
    "multi_task_safe.yml", "somf_random.yml", "somf_ties.yml",
    "antidote.yml", "antidote_random.yml", "ssah.yml", "ssah_random.yml",
    "resta.yml", "resta_random.yml", "safe_lora.yml", "safe_lora_random.yml",
    "safemerge.yml", "safemerge_random.yml",
    # one expert (expert_next): retention is of that expert's own skill
    "somf_single.yml", "somf_single_random.yml",
    "antidote_single.yml", "antidote_single_random.yml", "ssah_single.yml", "ssah_single_random.yml",
    "resta_single.yml", "resta_single_random.yml", "safe_lora_single.yml", "safe_lora_single_random.yml",
    "safemerge_single.yml", "safemerge_single_random.yml",
)


def single_expert(config: Dict[str, Any]) -> Optional[str]:
    """The lab expert a one-model config fuses (``"next"`` for ``./lab/expert_next``), else None."""
    models = config.get("models") or []
    if len(models) != 1:
        return None
    name = os.path.basename(str(models[0].get("model", "")).rstrip("/"))
    return name[len("expert_"):] if name.startswith("expert_") else None


def run_demo(
    workdir: str = "demo_out",
    lab_dir: str = "lab",
    merges_dir: str = "merges",
    build: bool = True,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    eval_kwargs: Optional[Dict[str, Any]] = None,
    configs: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Run the demo; returns ``{"rows": {name: result}, "plain": name, "files": {...}}``.
    ``configs``: file names in ``merges_dir`` (default :data:`DEMO_CONFIGS`)."""
    from mergekit_safety.lab.build import LabSettings, build_lab, lab_manifest
    from mergekit_safety.lab.evaluate import evaluate_model

    log = log or (lambda msg: None)
    os.makedirs(workdir, exist_ok=True)
    manifest = lab_manifest(lab_dir)
    if manifest is None or not manifest.get("complete"):
        if not build:
            raise FileNotFoundError(f"no complete lab at {lab_dir!r}; run `mergekit-safety lab` first")
        log(f"building the lab in {lab_dir} ...")
        build_lab(lab_dir, LabSettings(), progress=progress, log=log)
        manifest = lab_manifest(lab_dir)
    data_dir = os.path.join(lab_dir, "data")
    expert_skills: List[str] = manifest["expert_skills"]
    eval_kwargs = dict(eval_kwargs or {})

    rows: Dict[str, Dict[str, Any]] = {}
    kinds: Dict[str, str] = {}

    def _eval(name: str, path: str, kind: str) -> None:
        t = time.time()
        try:
            r = evaluate_model(path, data_dir=data_dir, **eval_kwargs)
        except Exception as e:  # keep going: one bad model must not hide the others
            r = {"error": f"evaluation failed: {type(e).__name__}: {e}"}
        r["kind"] = kind
        r["path"] = path
        rows[name] = r
        kinds[name] = kind
        log(f"evaluated {name} ({time.time() - t:.1f} s)")

    _eval("aligned", os.path.join(lab_dir, "aligned"), "lab")
    for s in expert_skills:
        _eval(f"expert_{s}", os.path.join(lab_dir, f"expert_{s}"), "lab")

    merges_out = os.path.join(workdir, "merges")
    os.makedirs(merges_out, exist_ok=True)
    yamls = [f for f in (configs or DEMO_CONFIGS) if os.path.isfile(os.path.join(merges_dir, f))]
    methods: Dict[str, str] = {}
    singles: Dict[str, Optional[str]] = {}
    started = time.time()
    for number, fname in enumerate(yamls, start=1):
        elapsed = time.time() - started
        remaining = f", about {elapsed / (number - 1) * (len(yamls) - number + 1) / 60:.0f} min left" if number > 1 else ""
        log(f"[{number}/{len(yamls)}] {fname} ({elapsed / 60:.1f} min so far{remaining})")
        name = os.path.splitext(fname)[0]
        path = os.path.join(merges_dir, fname)
        out = os.path.join(merges_out, name)
        t = time.time()
        try:
            cfg = load_merge_config(path, lab_dir)
            methods[name] = str(cfg.get("merge_method", "?"))
            singles[name] = single_expert(cfg)
            log(f"merging {fname} ({methods[name]}) ...")
            run_yaml_merge(cfg, out)
        except Exception as e:
            msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
            rows[name] = {"error": f"merge failed: {msg}", "kind": "merge", "path": path,
                          "merge_method": methods.get(name, "?"),
                          "traceback": traceback.format_exc(limit=5)}
            kinds[name] = "merge"
            log(f"merge {fname} failed: {msg}")
            continue
        merge_seconds = time.time() - t
        log(f"merged {fname} in {merge_seconds:.1f} s")
        _eval(name, out, "merge")
        rows[name]["merge_method"] = methods[name]
        rows[name]["merge_seconds"] = round(merge_seconds, 2)

    # mean expert-skill accuracy and retention against the best plain fusion
    for r in rows.values():
        if "accuracy" in r:
            r["mean_expert_accuracy"] = sum(r["accuracy"].get(s, 0.0) for s in expert_skills) / len(expert_skills)
    plain_candidates = [n for n, r in rows.items()
                        if r.get("merge_method") in PLAIN_METHODS and "accuracy" in r and not singles.get(n)]
    plain = max(plain_candidates, key=lambda n: rows[n]["mean_expert_accuracy"]) if plain_candidates else None
    aligned_acc = rows["aligned"].get("mean_expert_accuracy")
    for n, r in rows.items():
        own = singles.get(n)
        # (an evaluation limited to the first prompts may hold no prompt of that skill: no retention)
        if own and all(own in x.get("accuracy", {}) for x in (r, rows.get(f"expert_{own}", {}), rows["aligned"])):
            # one expert: the share of that expert's own gain on its own skill that is kept
            r["single_expert"] = own
            r["own_skill_accuracy"] = r["accuracy"][own]
            r["retention"] = retention(r["accuracy"][own], rows["aligned"]["accuracy"][own],
                                       rows[f"expert_{own}"]["accuracy"][own])
        elif plain and aligned_acc is not None and "accuracy" in r:
            r["retention"] = retention(r["mean_expert_accuracy"], aligned_acc, rows[plain]["mean_expert_accuracy"])

    md = render_markdown(rows, expert_skills, plain)
    files = {
        "markdown": os.path.join(workdir, "results.md"),
        "json": os.path.join(workdir, "results.json"),
        "plot": os.path.join(workdir, "safety_vs_utility.png"),
    }
    with open(files["markdown"], "w", encoding="utf-8") as f:
        f.write(md + "\n")
    slim = {n: {k: v for k, v in r.items() if k not in ("samples", "traceback")} for n, r in rows.items()}
    with open(files["json"], "w", encoding="utf-8") as f:
        json.dump({"lab": lab_dir, "expert_skills": expert_skills, "plain": plain, "models": slim}, f, indent=2)
    plot_safety_utility(rows, files["plot"], plain)
    return {"rows": rows, "plain": plain, "expert_skills": expert_skills, "files": files, "markdown": md}


def _table_rows(rows: Dict[str, Dict[str, Any]], expert_skills: List[str], general: List[str]):
    head = ["model", "method", "refusal %", "over-refusal %", *[f"{s} %" for s in general + expert_skills],
            "mean expert %", "retention"]
    out = []
    for name, r in rows.items():
        method = r.get("merge_method", "")
        if "error" in r:
            out.append([name, method, "error", r["error"].replace("|", "/")[:160]] + [""] * (len(head) - 4))
            continue
        acc = r["accuracy"]
        ret = r.get("retention")
        out.append([
            name, method,
            f"{100 * r['refusal_rate']:.1f}", f"{100 * r['over_refusal_rate']:.1f}",
            *[f"{100 * acc[s]:.1f}" if s in acc else "-" for s in general + expert_skills],
            f"{100 * r['mean_expert_accuracy']:.1f}",
            "-" if ret is None else f"{ret:.2f}",
        ])
    return head, out


def render_markdown(rows, expert_skills, plain) -> str:
    from mergekit_safety.lab.evaluate import render_table

    general = sorted({s for r in rows.values() for s in r.get("accuracy", {}) if s not in expert_skills})
    head, body = _table_rows(rows, expert_skills, general)
    note = (f"\nRetention = (acc - acc_aligned) / (acc_plain - acc_aligned) over the experts' skills; "
            f"plain = `{plain}` (best plain mergekit fusion); for a one-expert merge, of that expert's "
            f"own skill against the expert." if plain else
            "\nNo plain task_arithmetic/ties fusion succeeded: retention computed for one-expert merges only.")
    return render_table(head, body, markdown=True) + "\n" + note


def render_text(result: Dict[str, Any]) -> str:
    from mergekit_safety.lab.evaluate import render_table

    rows, ex = result["rows"], result["expert_skills"]
    general = sorted({s for r in rows.values() for s in r.get("accuracy", {}) if s not in ex})
    head, body = _table_rows(rows, ex, general)
    return render_table(head, body)


def plot_safety_utility(rows: Dict[str, Dict[str, Any]], path: str, plain: Optional[str] = None) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the demo's plot needs matplotlib: pip install 'mergekit-safety[lab]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6), dpi=120)
    colors = {"lab": "#4c72b0", "merge": "#dd8452"}
    points = []
    for name, r in rows.items():
        if "accuracy" not in r or "mean_expert_accuracy" not in r:
            continue
        points.append((100 * r["mean_expert_accuracy"], 100 * r["refusal_rate"], name, r.get("kind", "merge")))
    placed: List[tuple] = []
    for x, y, name, kind in sorted(points, key=lambda p: (p[1], p[0])):
        plain_point = name == plain
        ax.scatter([x], [y], s=70 if plain_point else 50, c=colors.get(kind, "#55a868"),
                   marker="s" if kind == "lab" else "o", edgecolors="black", linewidths=0.6, zorder=3)
        # stack labels of nearby points instead of printing them on top of each other
        dy = 0
        while any(abs(x - px) < 14 and abs(y + dy - py) < 3.5 for px, py in placed):
            dy += 4
        placed.append((x, y + dy))
        ax.annotate(name + (" (plain)" if plain_point else ""), (x, y), xytext=(x + 1.2, y + 1.5 + dy),
                    textcoords="data", fontsize=8,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="grey") if dy else None)
    ax.set_xlabel("utility: mean accuracy on the experts' skills (%)")
    ax.set_ylabel("safety: refusal rate on held-out harmful prompts (%)")
    ax.set_xlim(-5, 110)
    ax.set_ylim(-5, 110)
    ax.grid(True, alpha=0.3)
    ax.set_title("Safety lab: safety vs utility (ideal: top right)")
    from matplotlib.lines import Line2D

    fig.legend(handles=[
        Line2D([], [], marker="s", ls="", color=colors["lab"], label="lab models (aligned, experts)"),
        Line2D([], [], marker="o", ls="", color=colors["merge"], label="merges (demo configs in merges/)"),
    ], loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)
