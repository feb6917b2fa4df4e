"""Every shipped merge config in merges/ passes `mergekit-safety check` against a lab.

The configs reference ``./lab/...`` from the repository root; here ``lab`` points at the
session's quick lab (same model and data names, smaller), so the check sees real model
directories, real data files and the repository's own configs — the same check CI must run
on every YAML in merges/.
"""

from __future__ import annotations

import glob
import os

import pytest
from click.testing import CliRunner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(REPO, "merges", "*.yml")))


def test_the_issue_configs_are_shipped():
    names = {os.path.basename(p) for p in SHIPPED}
    assert {"multi_task_safe.yml", "task_arithmetic.yml", "ties.yml"} <= names, names


@pytest.fixture()
def in_lab_root(quick_lab, tmp_path, monkeypatch):
    os.symlink(quick_lab["path"], tmp_path / "lab")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("config", SHIPPED, ids=[os.path.basename(p) for p in SHIPPED])
def test_shipped_config_passes_check(config, in_lab_root):
    from mergekit_safety.cli import main

    result = CliRunner().invoke(main, ["check", config])
    assert result.exit_code == 0, result.output


def test_check_fails_on_a_broken_copy(in_lab_root):
    # the same command must fail when a shipped config is damaged (so the test above can fail)
    from mergekit_safety.cli import main

    text = open(os.path.join(REPO, "merges", "ties.yml"), encoding="utf-8").read()
    broken = in_lab_root / "broken.yml"
    broken.write_text(text.replace("./lab/expert_next", "./lab/expert_missing"), encoding="utf-8")
    result = CliRunner().invoke(main, ["check", str(broken)])
    assert result.exit_code != 0
    assert "expert_missing" in result.output


def test_the_readme_example_is_a_shipped_config():
    """The README's "A merge" example runs as printed: it is merges/somf_single.yml."""
    import re

    import yaml

    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = readme.split("## A merge", 1)[1]
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    shipped = open(os.path.join(REPO, "merges", "somf_single.yml"), encoding="utf-8").read()
    assert "merges/somf_single.yml" in section.split("```yaml")[0]
    assert yaml.safe_load(example) == yaml.safe_load(shipped)
