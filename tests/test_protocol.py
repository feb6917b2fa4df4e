"""SOMF's tuning protocol (mergekit_safety/lab/protocol.py): recipe parsing, the generated
configs, the target bookkeeping, and one tiny end-to-end run that resumes."""

from __future__ import annotations

import json
import os

import pytest

from mergekit_safety.lab import protocol


def test_recipe_parsing_checks_names_and_reads_yaml_scalars():
    assert protocol.parse_recipe("reference=aligned, benign_weight=1.0,steps=200") == {
        "reference": "aligned", "benign_weight": 1.0, "steps": 200}
    assert protocol.parse_recipe("") == {}
    # numbers as numbers (1e-3 too, which YAML 1.1 reads as text), booleans as YAML reads them
    assert protocol.parse_recipe("lr=1e-3,normalize=true,stop_on=greedy") == {
        "lr": 0.001, "normalize": True, "stop_on": "greedy"}
    with pytest.raises(ValueError, match="no parameter 'benign_weigth'"):
        protocol.parse_recipe("benign_weigth=1")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        protocol.parse_recipe("benign_weight")
    with pytest.raises(ValueError, match="set by the protocol"):
        protocol.parse_recipe("mask=x.safetensors")


def test_variant_configs_use_every_expert_and_one_recipe(tmp_path):
    skills = ["next", "twin", "code", "upper"]
    cfgs = protocol.variant_configs(str(tmp_path / "lab"), skills, {"benign_weight": 1.0}, str(tmp_path / "m"))
    assert set(cfgs) == set(protocol.CASES)
    for case in ("task_arithmetic", "ties", "somf", "somf_ties"):
        assert [os.path.basename(m["model"]) for m in cfgs[case]["models"]] == [f"expert_{s}" for s in skills]
    assert [os.path.basename(m["model"]) for m in cfgs["somf_single"]["models"]] == ["expert_next"]
    for case in ("somf", "somf_ties", "somf_single"):
        p, control = cfgs[case]["parameters"], cfgs[f"{case}_random"]["parameters"]
        assert p["benign_weight"] == 1.0 and "control" not in p
        # the control reuses its method's artifact and differs only by `control`
        assert {k: v for k, v in control.items() if k != "control"} == p and control["control"] == "random"
    assert cfgs["somf_ties"]["parameters"]["backbone"] == "ties"
    assert all(m["parameters"]["density"] == protocol.DENSITY for m in cfgs["somf_ties"]["models"])
    assert cfgs["somf"]["parameters"]["mask"] != cfgs["somf_ties"]["parameters"]["mask"]


def test_target_misses_name_the_gap():
    met = {"refusal_rate": 0.97, "over_refusal_rate": 0.02, "retention": 0.85, "control_gap": 0.9}
    assert protocol.target_misses("somf", met) == []
    missed = protocol.target_misses("somf", {**met, "refusal_rate": 0.93, "control_gap": 0.2})
    assert missed == ["refusal_rate 0.930 < 0.95", "random control only 20.0 points lower"]
    # one expert: 95 % of its own skill
    assert protocol.target_misses("somf_single", met) == ["retention 0.850 < 0.95"]


def test_calibration_score_is_the_worst_greedy_held_aside_share():
    variants = {"a": {"calibration": {"somf": {"held_preferred": 0.5, "greedy": {"harmful": 0.97, "benign": 1.0}}}},
                "b": {"calibration": {"somf": {"held_preferred": 1.0, "greedy": {"harmful": 1.0, "benign": 0.94}}}}}
    assert protocol.calibration_score(variants) == 0.94  # the greedy figure, not the rule's own
    variants["b"]["calibration"]["somf_ties"] = {"held_preferred": 1.0, "greedy": None}
    assert protocol.calibration_score(variants) is None  # a mask without the figure cannot be scored


@pytest.mark.slow
def test_protocol_runs_a_tiny_variant_and_resumes(tmp_path, monkeypatch):
    """A tiny two-expert lab, a few SOMF steps: every case merges and is evaluated, each mask's
    calibration figures come from its artifact, and a second call reuses the finished variant."""
    from mergekit_safety.lab import demo as demo_module

    monkeypatch.setitem(protocol.VARIANTS, "tiny", {"quick": True, "experts": 2, "pretrain_steps": 60,
                                                    "align_steps": 30, "expert_steps": 30})
    recipe = protocol.parse_recipe("steps=4,check_every=2,stop_preference=0.5,batch_size=4,max_length=64,"
                                   "stop_on=greedy,prefix_tokens=4")
    kwargs = dict(workdir=str(tmp_path / "work"), lab_root=str(tmp_path / "labs"), recipe=recipe,
                  progress=False, eval_kwargs={"limit": 12})
    res = protocol.run_protocol(["tiny"], **kwargs)
    v = res["variants"]["tiny"]
    assert v["experts"] == 2 and v["plain"] in ("task_arithmetic", "ties")
    for case in protocol.TARGETS:
        row, cal = v["rows"][case], v["calibration"][case]
        assert "error" not in row and 0.0 <= row["refusal_rate"] <= 1.0
        assert isinstance(row["misses"], list)
        assert 1 <= cal["steps_run"] <= 4 and cal["checked_step"] in (2, 4)
        assert 0.0 <= cal["held_preferred"] <= 1.0 and cal["stop_reason"]
        # the same held-aside split measured by greedy decoding, for any recipe
        greedy = cal["greedy"]
        # (the recipe's rule is greedy on 4 tokens with margin 0 here, so the two figures agree)
        assert greedy["clean"] and greedy["harmful_pairs"] == 16 and greedy["harmful"] == cal["held_preferred"]
    saved = json.load(open(tmp_path / "work" / "protocol.json"))
    assert saved["recipe"] == recipe and set(saved["variants"]) == {"tiny"}
    table = open(tmp_path / "work" / "protocol.md").read()
    assert "| tiny | somf_single |" in table and "`steps: 4`" in table

    def no_merge(*a, **k):
        raise AssertionError("a finished variant ran again")

    monkeypatch.setattr(demo_module, "run_demo", no_merge)
    again = protocol.run_protocol(["tiny"], **kwargs)
    assert again["variants"]["tiny"]["rows"] == v["rows"]
    # report only: the finished variant is in the table, an unfinished one is named, nothing runs
    monkeypatch.setitem(protocol.VARIANTS, "tiny2", {**protocol.VARIANTS["tiny"], "seed": 5})
    report = protocol.run_protocol(["tiny", "tiny2"], **kwargs, report_only=True)
    assert list(report["variants"]) == ["tiny"] and report["not_run"] == ["tiny2"]
    assert not os.path.isdir(tmp_path / "labs" / "tiny2" / "aligned")
    assert "Not run yet: tiny2." in open(tmp_path / "work" / "protocol.md").read()
    with pytest.raises(ValueError, match="unknown lab variant"):
        protocol.run_protocol(["seed9"], **kwargs)
