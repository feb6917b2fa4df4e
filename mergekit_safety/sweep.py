"""``mergekit-safety sweep``: the safety–utility frontier of a merge config.

    mergekit-safety sweep merges/ssah.yml --vary protect_share=0.05,0.2,0.5 --vary lambda=0.5,1.0

Every combination of the varied parameters (a grid) is merged through mergekit and evaluated
with ``eval`` (any prompt sets); the aligned base model and the plain fusion (the same backbone
and weights without any safety step) are evaluated once as references, so each point gets its
**retention** of the fusion's gain: (acc − acc_aligned) / (acc_plain − acc_aligned).

* Parameters: any global parameter of the config's method, or ``weight``/``density`` (set for
  every model). Names and values are checked before any merge (a misspelled name gets the
  closest known one; values are validated like the YAML's); a grid larger than ``max_points``
  needs ``yes``.
* Artifacts are reused: a data-driven method's points use ``mask: auto``, whose content-hashed
  artifact changes only when a setting that changes it is varied (``protect_share``,
  ``threshold``, ``control`` reuse one artifact).
* Resumable: each finished point is appended to ``results.jsonl``; a killed sweep continues
  where it stopped. Merged models are deleted after their evaluation unless ``keep``.
* Output: ``results.json``/``.csv``/``.md`` and ``frontier.png`` (refusal vs retention, 95 %
  Wilson intervals, Pareto-optimal points marked).
"""

from __future__ import annotations

import copy
import csv
import difflib
import hashlib
import itertools
import json
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

PER_MODEL = ("weight", "density")
DEFAULT_MAX_POINTS = 32


class SweepError(ValueError):
    """A sweep cannot start (the message names the parameter or value)."""


def parse_vary(specs: Sequence[str]) -> List[Tuple[str, List[Any]]]:
    """``["lambda=0.3,0.5", ...]`` → ``[("lambda", [0.3, 0.5]), ...]`` (values parsed as YAML)."""
    import yaml

    out = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not name or not values.strip():
            raise SweepError(f"--vary {spec!r}: write NAME=v1,v2,…")
        parsed = [yaml.safe_load(v.strip()) for v in values.split(",") if v.strip()]
        if any(name == n for n, _ in out):
            raise SweepError(f"--vary {name} is given twice")
        out.append((name, parsed))
    return out


def validate_vary(raw: Dict[str, Any], vary: List[Tuple[str, List[Any]]]) -> None:
    """Every varied name is a parameter of the config's method, every value valid for it."""
    from mergekit import merge_methods

    method_name = raw.get("merge_method")
    try:
        method = merge_methods.get(method_name)
    except RuntimeError:
        raise SweepError(f"unknown merge_method {method_name!r}") from None
    specs = {p.name: p for p in method.spec.parameters}
    for name, values in vary:
        if name not in specs:
            close = difflib.get_close_matches(name, list(specs), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SweepError(f"--vary {name}: {method_name} has no parameter {name!r}{hint}")
        for value in values:
            try:
                specs[name].validate(value)
            except Exception as error:  # noqa: BLE001 - pydantic / our named errors
                text = str(error).strip().splitlines()[0]
                raise SweepError(f"--vary {name}={value!r}: {text}") from None


def expand(vary: List[Tuple[str, List[Any]]]) -> List[Dict[str, Any]]:
    """The grid: one ``{name: value}`` per combination, in a stable order."""
    names = [n for n, _ in vary]
    return [dict(zip(names, combination)) for combination in itertools.product(*[v for _, v in vary])]


def point_config(raw: Dict[str, Any], point: Dict[str, Any]) -> Dict[str, Any]:
    from mergekit_safety.fusion.locate import Locator
    from mergekit_safety.plugin.config import package_method

    config = copy.deepcopy(raw)
    parameters = dict(config.get("parameters") or {})
    for name, value in point.items():
        if name in PER_MODEL:
            for model in config.get("models") or []:
                model.setdefault("parameters", {})[name] = value
        else:
            parameters[name] = value
    from mergekit import merge_methods

    method = package_method(merge_methods.get(config["merge_method"]))
    if isinstance(method, Locator):
        parameters["mask"] = "auto"  # content-addressed: reused unless an artifact setting varies
    config["parameters"] = parameters
    return config


def plain_config(raw: Dict[str, Any]) -> Dict[str, Any]:
    """The same fusion without any safety step (``masked_fusion`` with the backbone settings)."""
    from mergekit import merge_methods

    from mergekit_safety.plugin.config import package_method

    method = package_method(merge_methods.get(raw["merge_method"]))
    config = copy.deepcopy(raw)
    if method is None:
        return config  # a mergekit method: it is its own plain fusion
    keep = {"backbone", "lambda", "normalize", "rescale", "int8_mask", "seed", "ties_selection"}
    config["merge_method"] = "masked_fusion"
    config["parameters"] = {k: v for k, v in (raw.get("parameters") or {}).items() if k in keep}
    for model in config.get("models") or []:
        model["parameters"] = {k: v for k, v in (model.get("parameters") or {}).items() if k in PER_MODEL}
    return config


def _key(config: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pareto(rows: Sequence[Dict[str, Any]], x: str, y: str) -> List[bool]:
    """Whether each row is Pareto-optimal for maximising both ``x`` and ``y``."""
    flags = []
    for row in rows:
        a, b = row.get(x), row.get(y)
        if a is None or b is None:
            flags.append(False)
            continue
        dominated = any(
            o is not row and o.get(x) is not None and o.get(y) is not None
            and o[x] >= a and o[y] >= b and (o[x] > a or o[y] > b)
            for o in rows
        )
        flags.append(not dominated)
    return flags


def run_sweep(
    config_path: str,
    vary_specs: Sequence[str],
    out_dir: str,
    *,
    eval_kwargs: Dict[str, Any],
    max_points: int = DEFAULT_MAX_POINTS,
    yes: bool = False,
    keep: bool = False,
    log: Optional[Callable[[str], None]] = None,
    command: Optional[str] = None,
) -> Dict[str, Any]:
    """Run (or resume) the sweep; return ``{"rows": [...], "files": {...}}``. ``command``: how
    to reproduce it, recorded in results.json (the combined frontier lists it)."""
    import yaml

    from mergekit_safety.lab.demo import retention, run_yaml_merge
    from mergekit_safety.lab.evaluate import evaluate_model

    log = log or (lambda message: None)
    with open(config_path, "r", encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    if not isinstance(raw, dict) or "merge_method" not in raw:
        raise SweepError(f"{config_path}: not a merge config")
    vary = parse_vary(vary_specs)
    if not vary:
        raise SweepError("nothing to sweep: give at least one --vary NAME=v1,v2")
    validate_vary(raw, vary)
    grid = expand(vary)
    if len(grid) > max_points and not yes:
        raise SweepError(f"the grid has {len(grid)} points (more than {max_points}): confirm with --yes")

    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, "results.jsonl")
    done: Dict[str, Dict[str, Any]] = {}
    if os.path.exists(results_path):
        with open(results_path, "r", encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: that point runs again
                done[row["key"]] = row

    jobs: List[Tuple[str, Dict[str, Any], Dict[str, Any]]] = [
        ("aligned", {}, {"evaluate_only": raw["base_model"]}),
        ("plain", {}, plain_config(raw)),
    ] + [(", ".join(f"{k}={v}" for k, v in point.items()), point, point_config(raw, point)) for point in grid]
    started = time.time()
    rows = []
    for number, (label, point, config) in enumerate(jobs, start=1):
        key = _key(config)
        if key in done:
            rows.append(done[key])
            continue
        elapsed = time.time() - started
        log(f"[{number}/{len(jobs)}] {label} ({elapsed / 60:.1f} min so far)")
        if "evaluate_only" in config:
            path, merge_seconds = config["evaluate_only"], None
        else:
            path = os.path.join(out_dir, "models", key)
            t = time.time()
            run_yaml_merge(config, path)
            merge_seconds = round(time.time() - t, 2)
        result = evaluate_model(path, **eval_kwargs)
        result.pop("samples", None)
        row = {"key": key, "label": label, "point": point, "config": config, "merge_seconds": merge_seconds,
               **{k: result.get(k) for k in ("refusal_rate", "refusal_interval", "over_refusal_rate",
                                             "over_refusal_interval", "accuracy", "mean_accuracy",
                                             "n_harmful", "n_benign", "judge")}}
        with open(results_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, default=str) + "\n")
        if "evaluate_only" not in config and not keep:
            shutil.rmtree(path, ignore_errors=True)
        rows.append(row)

    aligned = next(r for r in rows if r["label"] == "aligned")
    plain = next(r for r in rows if r["label"] == "plain")
    for row in rows:
        if row.get("mean_accuracy") is not None and aligned.get("mean_accuracy") is not None and plain.get("mean_accuracy") is not None:
            row["retention"] = retention(row["mean_accuracy"], aligned["mean_accuracy"], plain["mean_accuracy"])
    points = [r for r in rows if r["label"] not in ("aligned", "plain")]
    axis = "retention" if any(r.get("retention") is not None for r in points) else "mean_accuracy"
    for row, optimal in zip(points, pareto(points, "refusal_rate", axis)):
        row["pareto"] = optimal
    files = write_outputs(out_dir, rows, axis, [n for n, _ in vary],
                          extra={"method": raw["merge_method"], "config": config_path, "command": command})
    return {"rows": rows, "files": files, "axis": axis}


def write_outputs(out_dir: str, rows: List[Dict[str, Any]], axis: str, names: List[str],
                  extra: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    files = {"json": os.path.join(out_dir, "results.json"), "csv": os.path.join(out_dir, "results.csv"),
             "markdown": os.path.join(out_dir, "results.md"), "plot": os.path.join(out_dir, "frontier.png")}
    table = [{k: v for k, v in r.items() if k != "config"} for r in rows]
    with open(files["json"], "w", encoding="utf-8") as handle:
        json.dump({"axis": axis, "varied": names, **(extra or {}), "rows": table}, handle, indent=2, default=str)
    head = ["label", *names, "refusal", "refusal 95% CI", "over-refusal", "mean accuracy", "retention", "pareto"]

    def cells(row):
        low, high = row.get("refusal_interval") or (None, None)
        return [row["label"], *[row["point"].get(n, "") for n in names],
                _pct(row.get("refusal_rate")), f"{_pct(low)}–{_pct(high)}" if low is not None else "",
                _pct(row.get("over_refusal_rate")), _pct(row.get("mean_accuracy")),
                "" if row.get("retention") is None else f"{row['retention']:.2f}", "yes" if row.get("pareto") else ""]

    with open(files["csv"], "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(head)
        writer.writerows(cells(r) for r in rows)
    with open(files["markdown"], "w", encoding="utf-8") as handle:
        handle.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        for row in rows:
            handle.write("| " + " | ".join(str(c) for c in cells(row)) + " |\n")
    try:
        plot_frontier(rows, axis, files["plot"])
    except ImportError:
        files.pop("plot")
    return files


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def plot_frontier(rows: List[Dict[str, Any]], axis: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 5), dpi=110)
    for row in rows:
        x, y = row.get(axis), row.get("refusal_rate")
        if x is None or y is None:
            continue
        low, high = row.get("refusal_interval") or (y, y)
        style = {"aligned": ("s", "#4c72b0"), "plain": ("D", "#55a868")}.get(row["label"], ("o", "#dd8452"))
        ax.errorbar([x], [100 * y], yerr=[[100 * (y - low)], [100 * (high - y)]], fmt=style[0], color=style[1],
                    ecolor="#999999", capsize=3, markersize=8 if row.get("pareto") else 6,
                    markeredgecolor="black" if row.get("pareto") else style[1])
        ax.annotate(row["label"], (x, 100 * y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("retention of the fusion's gain" if axis == "retention" else "mean accuracy")
    ax.set_ylabel("refusal of harmful prompts (%), 95 % CI")
    ax.set_title("safety–utility frontier (black edge: Pareto-optimal)")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# ----------------------------------------------------------------------------- several sweeps


def _is_control(row: Dict[str, Any]) -> bool:
    return str(row.get("point", {}).get("control", "none")) == "random"


def combine_frontiers(sweep_dirs: Sequence[str], png_path: str, markdown_path: Optional[str] = None) -> Dict[str, Any]:
    """One figure (and table) of several sweeps: each sweep's points as a line from its weakest
    to its strongest setting, its random-control points (``control=random``) as crosses in the
    same colour, the aligned model and the plain fusion of the first sweep as references."""
    sweeps = []
    for folder in sweep_dirs:
        path = os.path.join(folder, "results.json")
        try:
            with open(path, "r", encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as error:
            raise SweepError(f"{path}: not a finished sweep ({error})") from None
        sweeps.append((os.path.basename(os.path.normpath(folder)), data))
    if not sweeps:
        raise SweepError("no sweep folders given")
    # retention where every sweep has it; otherwise every sweep on its mean accuracy
    axis = "retention" if all(data["axis"] == "retention" for _, data in sweeps) else "mean_accuracy"
    _plot_combined(sweeps, axis, png_path)
    files = {"plot": png_path}
    if markdown_path:
        with open(markdown_path, "w", encoding="utf-8") as handle:
            handle.write(combined_markdown(sweeps, axis))
        files["markdown"] = markdown_path
    return {"axis": axis, "sweeps": [name for name, _ in sweeps], "files": files}


def combined_markdown(sweeps: Sequence[Tuple[str, Dict[str, Any]]], axis: str) -> str:
    lines = ["| sweep | point | refusal % (95 % CI) | over-refusal % | " + ("retention" if axis == "retention" else "mean accuracy %")
             + " | control | Pareto |", "|---|---|---:|---:|---:|---|---|"]
    commands = []
    for name, data in sweeps:
        for row in data["rows"]:
            low, high = row.get("refusal_interval") or (None, None)
            value = row.get(axis)
            lines.append("| " + " | ".join([
                name, row["label"],
                f"{_pct(row.get('refusal_rate'))} ({_pct(low)}–{_pct(high)})" if low is not None else _pct(row.get("refusal_rate")),
                _pct(row.get("over_refusal_rate")),
                "" if value is None else (f"{value:.2f}" if axis == "retention" else _pct(value)),
                "random" if _is_control(row) else "", "yes" if row.get("pareto") else "",
            ]) + " |")
        if data.get("command"):
            commands.append(f"* {name}: `{data['command']}`")
    return "\n".join(lines) + ("\n\nReproduce:\n\n" + "\n".join(commands) if commands else "") + "\n"


def _plot_combined(sweeps, axis: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8.5, 6), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, data) in enumerate(sweeps):
        colour = colours[index % len(colours)]
        points = [r for r in data["rows"] if r["label"] not in ("aligned", "plain")
                  and r.get(axis) is not None and r.get("refusal_rate") is not None]
        learned = sorted((r for r in points if not _is_control(r)), key=lambda r: r[axis])
        controls = [r for r in points if _is_control(r)]
        for rows, marker, style, label in ((learned, "o", "-", name), (controls, "x", ":", f"{name} random control")):
            if not rows:
                continue
            xs = [r[axis] for r in rows]
            ys = [100 * r["refusal_rate"] for r in rows]
            low = [100 * (r["refusal_rate"] - (r.get("refusal_interval") or (r["refusal_rate"],) * 2)[0]) for r in rows]
            high = [100 * ((r.get("refusal_interval") or (r["refusal_rate"],) * 2)[1] - r["refusal_rate"]) for r in rows]
            ax.errorbar(xs, ys, yerr=[low, high], fmt=marker + style, color=colour, ecolor=colour, alpha=0.9 if marker == "o" else 0.6,
                        capsize=2, markersize=6, linewidth=1, label=label)
    reference = sweeps[0][1]["rows"]
    for label, marker in (("aligned", "s"), ("plain", "D")):
        row = next((r for r in reference if r["label"] == label), None)
        if row is not None and row.get(axis) is not None:
            ax.scatter([row[axis]], [100 * row["refusal_rate"]], marker=marker, s=70, color="black", zorder=5,
                       label="aligned model" if label == "aligned" else "plain fusion")
    ax.set_xlabel("retention of the fusion's gain" if axis == "retention" else "mean accuracy")
    ax.set_ylabel("refusal of held-out harmful prompts (%), 95 % CI")
    ax.set_title("safety–utility frontier of every method (crosses: random controls)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
