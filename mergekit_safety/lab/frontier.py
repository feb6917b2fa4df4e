"""Every method's safety–utility frontier on the lab, on one figure (``mergekit-safety demo --frontier``).

Each method's shipped three-expert config is swept over its strength knob, once with the
method's own choice and once with its equal-size random control (``control=random``), through
:func:`mergekit_safety.sweep.run_sweep` (resumable, artifacts reused where the knob does not
change them); :func:`mergekit_safety.sweep.combine_frontiers` draws them together. The
commands that reproduce each sweep are written into the table beside the figure.
"""

from __future__ import annotations

import os
import shlex
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

#: method → (shipped config, the --vary arguments of its sweep)
FRONTIER_SWEEPS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "somf": ("multi_task_safe.yml", ("mask_threshold=-1.0,-0.5,0.0,0.5,1.0,2.0", "control=none,random")),
    "ssah": ("ssah.yml", ("protect_share=0.075,0.2,0.4,0.6,0.8", "control=none,random")),
    "antidote": ("antidote.yml", ("alpha=0.05,0.1,0.2,0.4,0.7", "control=none,random")),
    "resta": ("resta.yml", ("gamma=0.25,0.5,1.0,2.0,4.0", "control=none,random")),
    "safe_lora": ("safe_lora.yml", ("threshold=0.05,0.1,0.2,0.3,0.5", "control=none,random")),
    "safemerge": ("safemerge.yml", ("threshold=0.05,0.1,0.2,0.3,0.5", "control=none,random")),
}


def run_frontier(
    workdir: str,
    lab_dir: str = "lab",
    merges_dir: str = "merges",
    methods: Optional[Sequence[str]] = None,
    sweeps: Optional[Dict[str, Tuple[str, Tuple[str, ...]]]] = None,
    log: Optional[Callable[[str], None]] = None,
    eval_kwargs: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Run (or resume) the sweeps into ``workdir/<method>`` and draw ``workdir/frontier.png``
    with its table ``workdir/frontier.md``."""
    import yaml

    from mergekit_safety.lab.demo import load_merge_config
    from mergekit_safety.sweep import combine_frontiers, run_sweep

    log = log or (lambda message: None)
    sweeps = dict(sweeps or FRONTIER_SWEEPS)
    unknown = [m for m in (methods or []) if m not in sweeps]
    if unknown:
        raise ValueError(f"no frontier sweep for {', '.join(unknown)} (known: {', '.join(sweeps)})")
    chosen = [m for m in sweeps if not methods or m in methods]
    os.makedirs(os.path.join(workdir, "configs"), exist_ok=True)
    eval_kwargs = dict(eval_kwargs or {})
    eval_kwargs.setdefault("data_dir", os.path.join(lab_dir, "data"))
    folders = []
    for number, method in enumerate(chosen, start=1):
        config_name, vary = sweeps[method]
        # the shipped config with its lab paths pointed at lab_dir
        config = load_merge_config(os.path.join(merges_dir, config_name), lab_dir)
        config_path = os.path.join(workdir, "configs", config_name)
        with open(config_path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)
        out = os.path.join(workdir, method)
        # the config the sweep really ran (its lab paths rewritten), so the command reproduces it
        command = shlex.join(["mergekit-safety", "sweep", config_path, *[a for v in vary for a in ("--vary", v)],
                              "--out", out, "--data", eval_kwargs["data_dir"]]
                             + (["--limit", str(eval_kwargs["limit"])] if eval_kwargs.get("limit") else []))
        log(f"[frontier {number}/{len(chosen)}] {method}: {command}")
        run_sweep(config_path, vary, out, eval_kwargs=eval_kwargs, log=log, command=command)
        folders.append(out)
    result = combine_frontiers(folders, os.path.join(workdir, "frontier.png"), os.path.join(workdir, "frontier.md"))
    return {**result, "sweeps": dict(zip(chosen, folders))}
