"""Sweep the plain mergekit fusions of the lab's experts (how ``merges/*.yml`` were tuned).

    python -m mergekit_safety.lab.sweep [--lab lab] [--workdir out/sweep] [--json sweep.json]

Task arithmetic: equal weights w (no normalisation). TIES: density d (magnitude top-d per
expert), sign election, equal weights w, no normalisation. Every fusion is evaluated on the
lab's held-out sets; the table is printed (this is a script entry point, not library code).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any, Dict, List, Tuple

TA_WEIGHTS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TIES_GRID = tuple((d, w) for d in (0.3, 0.6) for w in (0.8, 1.0, 1.2))


def fusion_config(method: str, lab_dir: str, experts: List[str], weight: float, density: float = 1.0) -> Dict[str, Any]:
    lab_dir = lab_dir if os.path.isabs(lab_dir) or lab_dir.startswith(".") else "./" + lab_dir
    params: Dict[str, Any] = {"weight": weight}
    if method == "ties":
        params["density"] = density
    return {
        "merge_method": method,
        "base_model": os.path.join(lab_dir, "aligned"),
        "models": [{"model": os.path.join(lab_dir, f"expert_{s}"), "parameters": dict(params)} for s in experts],
        "parameters": {"normalize": False},
        "dtype": "float32",
        "tokenizer_source": "base",
    }


def sweep(lab_dir: str, workdir: str, grid: List[Tuple[str, float, float]] = None) -> Dict[str, Dict[str, Any]]:
    from mergekit_safety.lab.build import lab_manifest
    from mergekit_safety.lab.demo import run_yaml_merge
    from mergekit_safety.lab.evaluate import evaluate_model

    manifest = lab_manifest(lab_dir)
    if not manifest or not manifest.get("complete"):
        raise FileNotFoundError(f"no complete lab in {lab_dir}")
    experts = manifest["expert_skills"]
    grid = grid or ([("task_arithmetic", w, 1.0) for w in TA_WEIGHTS] + [("ties", w, d) for d, w in TIES_GRID])
    results: Dict[str, Dict[str, Any]] = {}
    for method, w, d in grid:
        name = f"{method} w={w}" + (f" d={d}" if method == "ties" else "")
        out = os.path.join(workdir, name.replace(" ", "_").replace("=", ""))
        run_yaml_merge(fusion_config(method, lab_dir, experts, w, d), out)
        r = evaluate_model(out, data_dir=os.path.join(lab_dir, "data"))
        r["config"] = {"method": method, "weight": w, "density": d}
        results[name] = r
        shutil.rmtree(out, ignore_errors=True)
    return results


def main() -> None:  # pragma: no cover - script
    from mergekit_safety.lab.evaluate import format_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lab", default="lab")
    ap.add_argument("--workdir", default=os.path.join("out", "sweep"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res = sweep(a.lab, a.workdir)
    print(format_table(res))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in res.items()}, f, indent=2)


if __name__ == "__main__":  # pragma: no cover
    main()
