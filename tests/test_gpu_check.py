"""The GPU check script's CPU dry run (issue 16: it must pass in CI). On a CPU both "executors"
are the CPU, so every merge must come out identical and every figure must be present; no
timing is asserted (benchmarks print ratios, tests never time anything)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu_check-cpu.json"
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "MERGEKIT_SAFETY_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--device", "cpu",
                           "--size", "tiny", "--steps", "1", "--samples", "8", "--workdir", str(tmp_path / "work"),
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    merges = {row["merge"]: row for row in report["merges"]}
    assert set(merges) == {"mergekit task_arithmetic", "masked_fusion + mask", "resta", "safe_lora", "safemerge",
                           "somf + artifact", "ssah + artifact", "antidote + artifact"}
    assert all(row["max_relative_difference"] == 0.0 for row in merges.values())
    assert report["calibration"]["max_relative_difference"] == 0.0
    assert report["somf"]["step_seconds"] > 0 and report["somf"]["plain_step_seconds"] > 0
    import torch

    if torch.cuda.device_count() > 7:
        return
    with pytest.raises(subprocess.CalledProcessError):  # a device this machine lacks: a clear error, no work
        subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--device", "cuda:7",
                        "--workdir", str(tmp_path / "w2")], capture_output=True, text=True, env=env, check=True)
