"""The README's result tables are the result files' own renderings: a number in the README that
no results file holds (or an edited table) fails here."""

from __future__ import annotations

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    return open(os.path.join(REPO, "README.md"), encoding="utf-8").read()


def test_real_model_table_is_rendered_from_its_results_file():
    from mergekit_safety.testbed.report import summary_table

    results = json.load(open(os.path.join(REPO, "benchmarks", "results", "real_model.json"), encoding="utf-8"))
    table = summary_table(results["entries"], results["best_plain_fusion"])
    assert table.count("\n") > 5
    assert table in _readme()


def test_lab_seed_table_is_rendered_from_its_results_file():
    """Once the lab table over seeds is in the README (between its markers), it must be the
    rendering of benchmarks/results/lab_seeds.json."""
    from mergekit_safety.lab.seeds import render_markdown

    readme = _readme()
    start, end = "<!-- lab_seeds.json -->", "<!-- /lab_seeds.json -->"
    path = os.path.join(REPO, "benchmarks", "results", "lab_seeds.json")
    if start not in readme:
        assert not os.path.exists(path), "benchmarks/results/lab_seeds.json exists: put its table in the README"
        return
    block = readme.split(start, 1)[1].split(end, 1)[0].strip()
    summary = json.load(open(path, encoding="utf-8"))
    assert len(summary["seeds"]) >= 3, "the lab table is reported over at least 3 seeds"
    assert block == render_markdown(summary).strip()


def test_every_method_table_is_rendered_from_its_results_files():
    """Issue 17's table: every method on the lab and on the real testbed, rendered from the
    lab's seed summary, the real testbed's results and the data-free merge times."""
    from mergekit_safety.testbed.report import methods_table

    results = os.path.join(REPO, "benchmarks", "results")
    lab = json.load(open(os.path.join(results, "lab_seeds.json"), encoding="utf-8"))
    real = json.load(open(os.path.join(results, "real_model.json"), encoding="utf-8"))
    merges = json.load(open(os.path.join(results, "merge_testbed_lora_datafree.json"), encoding="utf-8"))
    table = methods_table(lab, real, {r["ours"]: r["time_ratio"] for r in merges["ratios"]})
    assert table.count("\n") >= 14 and "[" in table
    assert table in _readme()
