"""Hash what every shipped merge config writes, to prove a refactoring changed no output.

Runs each ``merges/*.yml`` through the unmodified ``mergekit-yaml`` on a quick lab (built or
reused at ``--lab``), from a scratch folder where ``./lab`` points at it, and prints one JSON
object: config name → sha256 of every output ``*.safetensors`` file, plus the sha256 of
``mergekit-safety methods``. Mask learning is capped at ``--max-steps`` optimisation steps and
artifacts go to the scratch folder (not the lab), so the run takes minutes and the outputs
still go through every code path of every method. Compare two runs' JSON (before and after a
change) with ``--compare OLD.json``.

    python scripts/merge_hashes.py --lab /tmp/quick-lab --json before.json
    python scripts/merge_hashes.py --lab /tmp/quick-lab --compare before.json
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lab", required=True, help="quick lab folder (built if missing)")
    parser.add_argument("--max-steps", type=int, default=20, help="cap on SOMF training steps")
    parser.add_argument("--json", default=None, help="write the hashes here")
    parser.add_argument("--compare", default=None, help="compare with an earlier --json file")
    args = parser.parse_args()

    bin_dir = os.path.dirname(sys.executable)
    lab = os.path.abspath(args.lab)
    subprocess.run([os.path.join(bin_dir, "mergekit-safety"), "lab", "--quick", "--out", lab,
                    "--threads", "1", "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    results = {}
    methods = subprocess.run([os.path.join(bin_dir, "mergekit-safety"), "methods"], check=True,
                             capture_output=True, text=True).stdout
    results["mergekit-safety methods"] = hashlib.sha256(methods.encode()).hexdigest()
    with tempfile.TemporaryDirectory(prefix="merge-hashes-") as scratch:
        os.symlink(lab, os.path.join(scratch, "lab"))
        os.makedirs(os.path.join(scratch, "masks"))
        env = dict(os.environ, OMP_NUM_THREADS="1", MERGEKIT_SAFETY_CACHE=os.path.join(scratch, "cache"))
        for config in sorted(glob.glob(os.path.join(REPO, "merges", "*.yml"))):
            name = os.path.basename(config)
            text = open(config, encoding="utf-8").read()
            text = re.sub(r"^(\s*)steps:\s*(\d+)", lambda m: f"{m.group(1)}steps: {min(int(m.group(2)), args.max_steps)}", text, flags=re.M)
            text = re.sub(r"^(\s*)mask:\s*lab/masks/", r"\1mask: masks/", text, flags=re.M)
            path = os.path.join(scratch, name)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
            out = os.path.join(scratch, "out", name[:-4])
            run = subprocess.run([os.path.join(bin_dir, "mergekit-yaml"), path, out],
                                 cwd=scratch, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                results[name] = {"error": run.stderr.strip().splitlines()[-1:]}
                print(f"{name}: FAILED\n{run.stderr[-2000:]}", file=sys.stderr)
                continue
            results[name] = {os.path.basename(f): sha256(f) for f in sorted(glob.glob(os.path.join(out, "*.safetensors")))}
            print(f"{name}: {len(results[name])} file(s)", file=sys.stderr)
    text = json.dumps(results, indent=2, sort_keys=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    print(text)
    if args.compare:
        with open(args.compare, encoding="utf-8") as handle:
            old = json.load(handle)
        differ = sorted(k for k in set(old) | set(results) if old.get(k) != results.get(k))
        print("identical" if not differ else f"DIFFERENT: {differ}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
