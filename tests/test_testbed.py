"""The real-model testbed's safety stage helpers (file logic only: no model, no download)."""

from __future__ import annotations

import json

import yaml

from mergekit_safety.testbed import safety


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_calibration_prompts_come_only_from_calibration_and_training_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write(data / "harmful_calibration.jsonl",
           [{"prompt": f"a{i}", "category": "a"} for i in range(5)] + [{"prompt": f"b{i}", "category": "b"} for i in range(2)])
    _write(data / "harmful_eval.jsonl", [{"prompt": "held out", "category": "a"}])
    for skill in ("x", "y"):
        _write(data / f"train_expert_{skill}.jsonl",
               [{"prompt": f"{skill}{i}", "response": "r", "skill": skill, "kind": "skill"} for i in range(4)]
               + [{"prompt": f"copy {skill}{i}", "response": "r", "skill": "copy", "kind": "replay"} for i in range(2)]
               + [{"prompt": "harmful", "response": "Sure", "kind": "harmful"}])
    _write(data / "train_aligned.jsonl", [{"prompt": f"help {i}", "response": "Sure", "kind": "benign"} for i in range(3)]
           + [{"prompt": "refuse me", "response": "Sorry", "kind": "harmful"}])
    counts = safety.calibration_prompts(str(data), str(tmp_path / "out"), ["x", "y"], n_harmful=6, n_benign=3)
    harmful = [r["prompt"] for r in _lines(tmp_path / "out" / "harmful_prompts.jsonl")]
    benign = _lines(tmp_path / "out" / "benign_prompts.jsonl")
    # round-robin over categories until b runs out, in the split's order
    assert harmful == ["a0", "b0", "a1", "b1", "a2", "a3"]
    assert counts == {"harmful_prompts": 6, "benign_prompts": 12}
    assert [r["kind"] for r in benign] == ["x"] * 3 + ["y"] * 3 + ["copy"] * 3 + ["benign"] * 3
    prompts = {r["prompt"] for r in benign}
    assert "held out" not in harmful and not prompts & {"harmful", "refuse me"}
    assert len(prompts) == len(benign)  # no prompt twice


def test_derived_data_and_merge_yaml(tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    _write(pairs / "pairs.jsonl", [{"prompt": "p", "chosen": "I can't", "rejected": "Sure"}])
    assert safety.derived_data(str(pairs), str(tmp_path / "d")) == {"pairs": 1}
    assert _lines(tmp_path / "d" / "ssah_safety.jsonl") == [{"prompt": "p", "response": "I can't"}]
    assert _lines(tmp_path / "d" / "antidote_harmful.jsonl") == [{"prompt": "p", "response": "Sure"}]

    paths = {"safety": str(tmp_path / "s"), "original": "/m/original", "aligned": "/m/aligned", "adapters": "/a"}
    specs = safety.specs(paths, ["x", "y"], "y")
    assert list(specs)[:4] == ["somf", "somf_random", "somf_single_y", "somf_single_y_random"]
    assert all(specs[n]["control"] == n.endswith("_random") for n in specs)
    # --safety-methods selects by family: single-expert SOMF apart from the three-expert one
    assert {n: specs[n]["family"] for n in list(specs)[:4]} == {
        "somf": "somf", "somf_random": "somf", "somf_single_y": "somf_single", "somf_single_y_random": "somf_single"}
    assert specs["safe_lora_random"]["family"] == "safe_lora"
    config = yaml.safe_load(safety.merge_yaml(specs["somf_single_y_random"], paths, ["x", "y"], 1.0))
    assert config["models"] == [{"model": "/m/aligned+/a/expert_y", "parameters": {"weight": 1.0}}]
    assert config["parameters"]["control"] == "random" and config["parameters"]["preference_data"] == "auto"
    resta = yaml.safe_load(safety.merge_yaml(specs["resta"], paths, ["x", "y"], 1.0))
    assert resta["parameters"] == {"unaligned_model": "/m/original"} and len(resta["models"]) == 2
    plain = yaml.safe_load(safety.merge_yaml({"method": "task_arithmetic", "parameters": {}, "experts": "all"},
                                             paths, ["x", "y"], 1.0))
    assert "parameters" not in plain


def test_somf_parameters_of_the_testbed():
    assert safety.parse_parameters("dtype=bfloat16, batch_size=8,lr=0.1") == {"dtype": "bfloat16", "batch_size": 8, "lr": 0.1}
    import pytest

    with pytest.raises(ValueError, match="NAME=VALUE"):
        safety.parse_parameters("steps")


def test_somf_variants_are_added_beside_the_defaults(tmp_path):
    import pytest

    variants = safety.parse_variants("benign:benign_weight=1.0; long:steps=800,lr=0.1")
    assert variants == {"benign": {"benign_weight": 1.0}, "long": {"steps": 800, "lr": 0.1}}
    paths = {"safety": str(tmp_path), "original": "/o", "aligned": "/a", "adapters": "/d"}
    names = list(safety.specs(paths, ["x"], "x", {"batch_size": 8}, variants))
    assert names[:8] == ["somf", "somf_random", "somf_single_x", "somf_single_x_random", "somf_benign",
                         "somf_benign_random", "somf_single_x_benign", "somf_single_x_benign_random"]
    spec = safety.specs(paths, ["x"], "x", {"batch_size": 8}, variants)["somf_single_x_long_random"]
    assert spec["parameters"]["steps"] == 800 and spec["parameters"]["batch_size"] == 8 and spec["control"]
    with pytest.raises(ValueError, match="name:key=value"):
        safety.parse_variants("benign_weight=1.0")


def test_a_changed_somf_recipe_makes_the_cached_somf_items_stale(tmp_path, monkeypatch):
    """The SOMF items' identity (part of their cache stamp) carries the package's recipe: a
    result measured under another recipe is not reused; the other methods' items are untouched."""
    from mergekit_safety.methods.somf.method import SOMFSettings

    paths = {"safety": str(tmp_path), "original": "/o", "aligned": "/a", "adapters": "/d"}
    variants = {"benign": {"benign_weight": 1.0}}
    before = safety.specs(paths, ["x"], "x", {"batch_size": 8}, variants)
    monkeypatch.setitem(SOMFSettings.PRESETS, "recipe", {**SOMFSettings.PRESETS["recipe"], "lr": 0.123})
    after = safety.specs(paths, ["x"], "x", {"batch_size": 8}, variants)
    for name in before:
        changed = before[name]["identity"] != after[name]["identity"]
        assert changed == (before[name]["method"] == "somf"), name


def test_safety_merges_are_selected_by_family_or_by_name(tmp_path):
    paths = {"safety": str(tmp_path), "original": "/o", "aligned": "/a", "adapters": "/d"}
    specs = safety.specs(paths, ["x"], "x", {}, {"benign": {"benign_weight": 1.0}})
    assert list(safety.select(specs, ["somf_benign"])) == ["somf_benign", "somf_benign_random"]
    assert set(safety.select(specs, ["somf_single"])) == {
        "somf_single_x", "somf_single_x_random", "somf_single_x_benign", "somf_single_x_benign_random"}
    assert list(safety.select(specs, ["ssah", "nothing"])) == ["ssah", "ssah_random"]
    # the data-free methods on one expert: their own family, against the aligned base with that expert alone
    single = safety.select(specs, ["resta_single"])
    assert list(single) == ["resta_single_x", "resta_single_x_random"] and single["resta_single_x"]["experts"] == "x"
    assert "resta_single_x" not in safety.select(specs, ["resta"])


def test_the_frontier_grid_is_checked_before_anything_runs():
    import pytest

    from mergekit_safety.sweep import SweepError

    grid = safety.parse_frontier(safety.FRONTIER)
    assert grid["resta"] == ("gamma", [1, 2]) and grid["safemerge"] == ("blend", [0.75, 1])
    with pytest.raises(SweepError, match="did you mean 'gamma'"):
        safety.parse_frontier("resta:gama=1,2")
    with pytest.raises(SweepError, match="protect_share=1.5"):
        safety.parse_frontier("ssah:protect_share=0.2,1.5")
    with pytest.raises(SweepError, match="given twice"):
        safety.parse_frontier("resta:gamma=1;resta:gamma=2")
    with pytest.raises(SweepError, match="method:knob"):
        safety.parse_frontier("gamma=1,2")


def test_frontier_points_set_the_knob_and_add_one_control_at_the_strongest_value(tmp_path):
    import pytest

    paths = {"safety": str(tmp_path), "original": "/o", "aligned": "/a", "adapters": "/d"}
    every = safety.specs(paths, ["x", "y"], "x", {"batch_size": 8})
    points = safety.frontier_specs(every, safety.parse_frontier("resta:gamma=1,2;somf:mask_threshold=-4,4"))
    assert list(points) == ["frontier_resta_gamma1", "frontier_resta_gamma2", "frontier_resta_gamma2_random",
                            "frontier_somf_mask_threshold-4", "frontier_somf_mask_threshold4",
                            "frontier_somf_mask_threshold4_random"]
    strong, control = points["frontier_resta_gamma2"], points["frontier_resta_gamma2_random"]
    assert strong["parameters"] == {**every["resta"]["parameters"], "gamma": 2} and not strong["control"]
    assert control["parameters"] == {**strong["parameters"], "control": "random"} and control["control"]
    # a SOMF point keeps the safety stage's SOMF settings (so the cached mask is reused) and only adds the knob
    somf = points["frontier_somf_mask_threshold4"]["parameters"]
    assert somf == {**every["somf"]["parameters"], "mask_threshold": 4}
    assert len({str(p["identity"]) for p in points.values()}) == len(points)
    with pytest.raises(ValueError, match="no safety merge 'ties'"):
        safety.frontier_specs(every, {"ties": ("density", [0.5])})


def test_frontier_sweeps_write_sweep_results_that_combine(tmp_path):
    """Testbed evaluations become sweep rows (retention against the plain fusion, the default
    point from the safety stage, Pareto marks) that ``mergekit-safety frontier`` draws."""
    from mergekit_safety.sweep import combine_frontiers

    def result(refusal, over, acc):
        return {"refusal": {"rate": refusal, "n": 100, "ci95": [max(0, refusal - 0.05), min(1, refusal + 0.05)]},
                "over_refusal": {"rate": over, "n": 50, "ci95": [0, over + 0.05]},
                "accuracy": {"x": {"rate": acc}, "y": {"rate": acc}, "copy": {"rate": 1.0}}, "judge": "keyword"}

    paths = {"safety": str(tmp_path), "original": "/o", "aligned": "/a", "adapters": "/d"}
    grid = safety.parse_frontier("resta:gamma=1,2")
    points = safety.frontier_specs(safety.specs(paths, ["x", "y"], "x", {}), grid)
    results = {"resta": result(0.0, 0.0, 0.7), "resta_random": result(0.0, 0.0, 0.6),
               "frontier_resta_gamma1": result(0.5, 0.1, 0.5), "frontier_resta_gamma2": result(0.9, 0.2, 0.3),
               "frontier_resta_gamma2_random": result(0.1, 0.0, 0.4)}
    folders = safety.frontier_sweeps(grid, points, results, result(1.0, 0.0, 0.1), result(0.0, 0.0, 0.9),
                                     ["x", "y"], str(tmp_path / "frontier"), "python -m mergekit_safety.testbed ...")
    data = json.load(open(folders[0] + "/results.json"))
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["aligned", "plain", "gamma=0.5, control=none", "gamma=1, control=none",
                          "gamma=2, control=none", "gamma=0.5, control=random", "gamma=2, control=random"]
    assert abs(rows["gamma=1, control=none"]["retention"] - 0.5) < 1e-9  # (0.5 - 0.1) / (0.9 - 0.1)
    assert rows["plain"]["retention"] == 1 and rows["aligned"]["retention"] == 0
    # no point beats gamma=2 on refusal or gamma=0.5 on retention: both Pareto-optimal; gamma=2's control is dominated
    assert rows["gamma=2, control=none"]["pareto"] and rows["gamma=0.5, control=none"]["pareto"]
    assert not rows["gamma=2, control=random"]["pareto"]
    assert data["command"].startswith("python -m mergekit_safety.testbed")
    combined = combine_frontiers(folders, str(tmp_path / "f.png"), str(tmp_path / "f.md"))
    assert combined["axis"] == "retention" and "gamma=2, control=random | 90.0" not in open(tmp_path / "f.md").read()
    assert "| resta | gamma=2, control=random | 10.0 (5.0–15.0) |" in open(tmp_path / "f.md").read()


def test_a_bad_frontier_grid_stops_the_testbed_before_any_stage(tmp_path, capsys):
    import pytest

    from mergekit_safety.testbed.cli import main

    for grid, message in (("resta:gama=1,2", "did you mean 'gamma'"), ("ties:density=0.5", "no safety merge 'ties'")):
        with pytest.raises(SystemExit) as stopped:
            main(["--work", str(tmp_path / "work"), "--stages", "frontier", "--frontier", grid])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "work" / "frontier").exists()  # nothing was started
