"""Shared fixtures: one reduced ("quick") safety lab per test session, and its evaluations.

The quick lab is built once into a session temp dir (about a minute on 2 CPU cores). Set
``MERGEKIT_SAFETY_TEST_LAB=/path`` to build/reuse it at a fixed path instead (its stages are
cached by settings stamp, so a second session reuses them).
"""

from __future__ import annotations

import os

import pytest

QUICK_SEED = 0


@pytest.fixture(scope="session")
def quick_lab(tmp_path_factory):
    """Path of a built quick lab (``LabSettings(quick=True)``) and its build report."""
    from mergekit_safety.lab.build import LabSettings, build_lab

    out = os.environ.get("MERGEKIT_SAFETY_TEST_LAB") or str(tmp_path_factory.mktemp("lab") / "lab")
    report = build_lab(out, LabSettings(quick=True, seed=QUICK_SEED), progress=False)
    return {"path": out, "report": report}


@pytest.fixture(scope="session")
def quick_lab_eval(quick_lab):
    """evaluate_model() of every model of the quick lab: name -> metrics dict."""
    from mergekit_safety.lab.evaluate import evaluate_model

    out = quick_lab["path"]
    models = quick_lab["report"]["manifest"]["models"]
    return {m: evaluate_model(os.path.join(out, m), data_dir=os.path.join(out, "data")) for m in models}
