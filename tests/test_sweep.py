"""`mergekit-safety sweep`: grid expansion, checks before any merge, artifact reuse, resume."""

from __future__ import annotations

import json
import os

import pytest

from tiny_models import build_lab_family, merge_yaml

from mergekit_safety.sweep import SweepError, expand, pareto, parse_vary, run_sweep, validate_vary

EXPERTS = ["expert0", "expert1"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SAFETY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    family = build_lab_family(str(root / "models"), experts=2, scale=0.3)
    data = root / "data"
    data.mkdir()
    (data / "eval_benign.jsonl").write_text(
        "".join(json.dumps({"prompt": f"copy a{i} b", "answer": f"a{i} b", "skill": "copy"}) + "\n" for i in range(3)))
    (data / "eval_harmful.jsonl").write_text(
        "".join(json.dumps({"prompt": f"copy bomb{i}"}) + "\n" for i in range(3)))
    calibration = data / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"prompt": f"copy x{i}", "response": f"x{i}"}) + "\n" for i in range(4)))
    return {"family": family, "data": str(data), "calibration": str(calibration), "root": root}


def test_grid_expansion_and_parsing():
    vary = parse_vary(["lambda=0.5,1.0", "backbone=ties,task_arithmetic"])
    assert vary == [("lambda", [0.5, 1.0]), ("backbone", ["ties", "task_arithmetic"])]
    grid = expand(vary)
    assert len(grid) == 4 and grid[0] == {"lambda": 0.5, "backbone": "ties"}
    with pytest.raises(SweepError, match="write NAME=v1,v2"):
        parse_vary(["lambda"])


def test_bad_names_values_and_large_grids_fail_before_any_merge(setup, tmp_path):
    raw = {"merge_method": "ssah"}
    with pytest.raises(SweepError, match="no parameter 'protect_shar'; did you mean 'protect_share'"):
        validate_vary(raw, parse_vary(["protect_shar=0.1"]))
    with pytest.raises(SweepError, match=r"protect_share=1.5: merge parameter 'protect_share'"):
        validate_vary(raw, parse_vary(["protect_share=0.1,1.5"]))
    config = tmp_path / "c.yml"
    config.write_text(merge_yaml("masked_fusion", setup["family"], EXPERTS))
    with pytest.raises(SweepError, match="the grid has 36 points .* --yes"):
        run_sweep(str(config), ["lambda=" + ",".join(str(i / 10) for i in range(6)),
                                "weight=" + ",".join(str(i / 10) for i in range(6))],
                  str(tmp_path / "out"), eval_kwargs={"data_dir": setup["data"]})
    assert not os.path.exists(tmp_path / "out" / "results.jsonl")


def test_pareto_marks_the_non_dominated_points():
    rows = [{"r": 0.9, "a": 0.1}, {"r": 0.5, "a": 0.5}, {"r": 0.4, "a": 0.4}, {"r": 0.1, "a": 0.9}]
    assert pareto(rows, "r", "a") == [True, True, False, True]


def test_sweep_reuses_the_artifact_and_resumes_after_a_kill(setup, tmp_path, monkeypatch):
    from mergekit_safety.methods.ssah.method import SSAHMethod

    calls = []
    original = SSAHMethod.compute_artifact

    def counting(self, request):
        calls.append(1)
        return original(self, request)

    monkeypatch.setattr(SSAHMethod, "compute_artifact", counting)
    config = tmp_path / "ssah.yml"
    config.write_text(merge_yaml("ssah", setup["family"], EXPERTS,
                                 f"  safety_data: {setup['calibration']}\n  utility_data: {setup['calibration']}\n"))
    out = str(tmp_path / "out")

    from mergekit_safety.lab import evaluate

    real = evaluate.evaluate_model
    seen = []

    def killed_after_three(path, **kwargs):
        if len(seen) == 3:
            raise KeyboardInterrupt  # the kill
        seen.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(str(config), ["protect_share=0.0,0.3,0.6"], out, eval_kwargs={"data_dir": setup["data"]})
    assert len(open(os.path.join(out, "results.jsonl")).readlines()) == 3  # aligned, plain, first point

    monkeypatch.setattr(evaluate, "evaluate_model", real)
    result = run_sweep(str(config), ["protect_share=0.0,0.3,0.6"], out, eval_kwargs={"data_dir": setup["data"]})
    rows = result["rows"]
    assert [r["label"] for r in rows] == ["aligned", "plain", "protect_share=0.0", "protect_share=0.3", "protect_share=0.6"]
    assert len(open(os.path.join(out, "results.jsonl")).readlines()) == 5  # only the two missing points ran
    assert len(calls) == 1  # protect_share is a merge-time choice: one artifact for every point
    # protecting nothing is the plain fusion
    assert (rows[2]["mean_accuracy"], rows[2]["refusal_rate"]) == (rows[1]["mean_accuracy"], rows[1]["refusal_rate"])
    assert all(os.path.getsize(f) > 0 for f in result["files"].values())
    assert not os.path.exists(os.path.join(out, "models")) or not os.listdir(os.path.join(out, "models"))


def test_frontier_of_several_sweeps_on_one_figure(quick_lab, tmp_path):
    """The demo's frontier: each method's sweep (its knob, with and without the random
    control) and one figure + table of all of them, with the command of each sweep."""
    from mergekit_safety.lab.frontier import run_frontier
    from mergekit_safety.sweep import SweepError, combine_frontiers

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sweeps = {"resta": ("resta.yml", ("gamma=0.5,2.0", "control=none,random")),
              "safemerge": ("safemerge.yml", ("threshold=0.3,0.9",))}
    result = run_frontier(str(tmp_path / "frontier"), lab_dir=quick_lab["path"], merges_dir=os.path.join(repo, "merges"),
                          sweeps=sweeps, eval_kwargs={"limit": 20})
    with open(result["files"]["plot"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    table = open(result["files"]["markdown"], encoding="utf-8").read()
    assert table.count("| resta | ") == 2 + 4 and table.count("| safemerge | ") == 2 + 2  # aligned, plain + points
    assert table.count("| random |") == 2  # the two resta control points
    assert "mergekit-safety sweep " in table and "--vary gamma=0.5,2.0" in table
    saved = json.load(open(os.path.join(result["sweeps"]["resta"], "results.json"), encoding="utf-8"))
    assert saved["method"] == "resta" and saved["command"].startswith("mergekit-safety sweep")
    with pytest.raises(ValueError, match="no frontier sweep for nonsense"):
        run_frontier(str(tmp_path / "f2"), lab_dir=quick_lab["path"], merges_dir=os.path.join(repo, "merges"),
                     methods=["nonsense"])
    with pytest.raises(SweepError, match="not a finished sweep"):
        combine_frontiers([str(tmp_path)], str(tmp_path / "x.png"))
