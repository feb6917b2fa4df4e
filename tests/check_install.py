"""Packaging check run by .ci/run (not a pytest module).

`installed`: in a fresh interpreter, plain mergekit finds our methods, and startup imports
neither torch nor mergekit. `uninstalled`: no file of ours is left in site-packages and
mergekit still works.
"""

import os
import subprocess
import sys
import sysconfig


def main(mode: str) -> None:
    site = sysconfig.get_paths()["purelib"]
    ours = [n for n in os.listdir(site) if "mergekit_safety" in n or "mergekit-safety" in n]
    probe = subprocess.run(
        [sys.executable, "-c", "import mergekit.merge_methods as m; print(sorted(x.spec.name for x in m.registered_methods()))"],
        capture_output=True, text=True, cwd="/", check=True,
    )
    if mode == "installed":
        assert "mergekit_safety_plugins.pth" in ours, ours
        assert "'masked_fusion'" in probe.stdout, probe.stdout
        start = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, cwd="/")
        heavy = [l for l in start.stderr.splitlines() if l.rsplit("|", 1)[-1].strip().split(".")[0] in ("torch", "mergekit")]
        assert not heavy, heavy
    elif mode == "uninstalled":
        assert ours == [], f"left behind after uninstall: {ours}"
        assert "'masked_fusion'" not in probe.stdout and "'linear'" in probe.stdout, probe.stdout
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(f"check_install {mode}: ok ({len(ours)} files of ours in site-packages)")


if __name__ == "__main__":
    main(sys.argv[1])
