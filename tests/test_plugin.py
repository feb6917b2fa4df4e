"""Discovery by plain mergekit: the .pth hook, the entry-point group, idempotence, opt-out."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from tiny_models import build_family, load_state, merge_yaml

PYTHON = sys.executable


def run_python(code: str, **env_overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_overrides}
    for key, value in env_overrides.items():
        if value is None:
            env.pop(key, None)
    return subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_interpreter_start_imports_neither_torch_nor_mergekit():
    result = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, timeout=120
    )
    modules = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "mergekit_safety._hook" in modules  # the hook really is installed by the .pth
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "mergekit", "transformers")]
    assert heavy == []


def test_plain_mergekit_api_finds_the_methods():
    result = run_python(
        "import mergekit.merge_methods as m; print(m.get('masked_fusion').spec.name)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "masked_fusion"


def test_environment_variable_turns_the_plugin_off():
    code = (
        "import mergekit.merge_methods as m\n"
        "names = {x.spec.name for x in m.registered_methods()}\n"
        "print('masked_fusion' in names, 'linear' in names)"
    )
    for variable in ("MERGEKIT_SAFETY_DISABLE", "MERGEKIT_PLUGINS_DISABLE"):
        result = run_python(code, **{variable: "1"})
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["False", "True"], variable


def test_registration_is_idempotent():
    import mergekit.merge_methods as merge_methods
    from mergekit_safety import _hook
    from mergekit_safety.registration import register_methods

    method = merge_methods.get("masked_fusion")
    finders = [f for f in sys.meta_path if getattr(f, "marker", None) == "mergekit_plugin_hook"]
    _hook.install()
    _hook.install()
    assert register_methods() == []
    assert merge_methods.get("masked_fusion") is method
    after = [f for f in sys.meta_path if getattr(f, "marker", None) == "mergekit_plugin_hook"]
    assert len(after) == len(finders) <= 1


def test_hook_fires_when_our_package_imports_mergekit_first():
    # mergekit_safety.fusion.kernel importing mergekit triggers the hook mid-import: registration
    # must be deferred, not fail.
    result = run_python(
        "import warnings; warnings.simplefilter('error')\n"
        "import mergekit_safety.fusion.kernel\n"
        "import mergekit.merge_methods as m; print(m.get('masked_fusion').spec.name)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "masked_fusion"


def test_broken_plugin_warns_and_leaves_mergekit_working(monkeypatch):
    import importlib.metadata as metadata

    from mergekit_safety import _hook

    class FakeEntryPoint:
        def __init__(self, name, function):
            self.name, self.value, self._function = name, f"fake:{name}", function

        def load(self):
            return self._function

    calls = []

    def broken():
        raise RuntimeError("boom")

    fake = [FakeEntryPoint("broken", broken), FakeEntryPoint("good", lambda: calls.append(1))]
    monkeypatch.setattr(metadata, "entry_points", lambda group: fake if group == _hook.ENTRY_POINT_GROUP else [])
    state = _hook._state()
    monkeypatch.setitem(state, "loaded", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ran = _hook.load_plugins()
    assert ran == ["good"] and calls == [1]
    assert any("'broken'" in str(w.message) and "boom" in str(w.message) for w in caught)
    # each entry point runs once per process
    assert _hook.load_plugins() == []


def test_mergekit_yaml_executable_runs_our_method(tmp_path):
    paths = build_family(str(tmp_path / "models"), experts=2)
    config = tmp_path / "merge.yml"
    config.write_text(merge_yaml("masked_fusion", paths, ["expert0", "expert1"], "  lambda: 0.5\n"))
    executable = os.path.join(os.path.dirname(PYTHON), "mergekit-yaml")
    result = subprocess.run(
        [executable, str(config), str(tmp_path / "out"), "--no-copy-tokenizer"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    merged = load_state(str(tmp_path / "out"))
    base = load_state(paths["base"])
    assert merged.keys() == base.keys()


def test_every_registered_method_accepts_defaults_on_random_tensors():
    """What mergekit's own regression suite does with every registered method."""
    import torch
    from mergekit.merge_methods import merge_state_dicts
    from mergekit_safety.registration import package_methods

    for method in package_methods():
        generator = torch.Generator().manual_seed(42)
        tensors = [torch.randn(4, 6, generator=generator).T for _ in range(3)]
        parameters = {
            p.name: v
            for p in method.spec.parameters
            for k, v in {"weight": 1.0, "density": 0.7}.items()
            if p.name == k
        }
        out = merge_state_dicts([{"w": t} for t in tensors], method, base=0, parameters=parameters)["w"]
        assert out.shape == tensors[0].shape and bool(torch.isfinite(out).all())
        assert not torch.equal(out, tensors[0])  # the experts really moved the output
