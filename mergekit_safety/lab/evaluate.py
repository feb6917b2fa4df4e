"""Safety / utility evaluation of any causal LM directory (``mergekit-safety eval``).

Measures, with greedy batched generation (left padding):

* ``refusal_rate``: share of held-out harmful prompts the judge marks as refused (safety),
  overall and per skill (``refusal_by_skill``);
* ``over_refusal_rate``: share of benign prompts refused (a model refusing everything loses);
* ``accuracy``: exact-match accuracy per skill on benign prompts (utility; answers compared
  after lower-casing and collapsing whitespace), and ``mean_accuracy`` over those skills.

Prompt files (JSONL, see ``docs/lab.md``): benign ``{"prompt", "answer", "skill"}`` and harmful
``{"prompt"}`` with an optional ``"skill"``. A lab data directory provides both
(``eval_benign.jsonl``, ``eval_harmful.jsonl``) plus ``manifest.json`` naming the expert skills,
which adds ``mean_expert_accuracy``.

Judges (defined in :mod:`mergekit_safety.judge`, importable from here too):
:class:`KeywordJudge` (default; refusal phrases in the opening of the response, own wording) or
:class:`ClassifierJudge` (a local HF sequence classifier).
Library code returns values and never prints.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

from mergekit_safety.engine.data import DataError, read_jsonl
# The judges live in mergekit_safety.judge; these names stay importable from here.
from mergekit_safety.judge import REFUSAL_PHRASES, ClassifierJudge, KeywordJudge, make_judge, normalize  # noqa: F401
from mergekit_safety.judge import wilson_interval

BENIGN_FILE = "eval_benign.jsonl"
HARMFUL_FILE = "eval_harmful.jsonl"
MANIFEST_FILE = "manifest.json"


def load_eval_sets(data_dir: Optional[str] = None, benign: Optional[str] = None,
                   harmful: Optional[str] = None):
    """(benign records, harmful records, manifest or None). Files override the data dir's."""
    if benign is None or harmful is None:
        if data_dir is None:
            raise ValueError("give a data directory or both --benign and --harmful files")
        benign = benign or os.path.join(data_dir, BENIGN_FILE)
        harmful = harmful or os.path.join(data_dir, HARMFUL_FILE)
    # benign prompts need no reference answer: without one they count for over-refusal only
    # (real benign or borderline prompts); with one they also score exact-match accuracy
    b = read_jsonl(benign, {"prompt": str}, nonempty=("prompt",))
    h = read_jsonl(harmful, {"prompt": str}, nonempty=("prompt",))
    for path, records in ((benign, b), (harmful, h)):
        for index, r in enumerate(records, start=1):
            for key in ("answer", "skill", "category"):
                if key in r and not isinstance(r[key], str):
                    raise DataError(f"{path}: record {index}: {key!r} must be a string")
    manifest = None
    if data_dir is not None and os.path.isfile(os.path.join(data_dir, MANIFEST_FILE)):
        with open(os.path.join(data_dir, MANIFEST_FILE), encoding="utf-8") as f:
            manifest = json.load(f)
    return b, h, manifest


from mergekit_safety.engine.generation import generate, load_model  # noqa: E402,F401  (moved)


def _rate(flags: Sequence[bool]) -> float:
    return float(sum(flags)) / len(flags) if flags else 0.0


def evaluate_model(
    model_dir: str,
    data_dir: Optional[str] = None,
    benign: Optional[str] = None,
    harmful: Optional[str] = None,
    judge: Any = None,
    batch_size: int = 128,
    max_new_tokens: Optional[int] = None,
    limit: Optional[int] = None,
    device: str = "cpu",
    model=None,
    tokenizer=None,
    dtype: str = "float32",
    audit: Optional[str] = None,
) -> Dict[str, Any]:
    """Evaluate one model; returns the metrics dict described in the module docstring.

    ``max_new_tokens`` defaults to the longest reference answer (in tokens) + 8, at least 16,
    so a refusal is always long enough to be recognised (64 when no benign prompt has a
    reference answer: real chat answers). ``limit`` keeps the first N prompts of each set (quick
    looks). ``model``/``tokenizer`` may be passed in-memory instead of loading. ``dtype``:
    float32, bfloat16 or float16. ``audit``: a JSONL path that receives every prompt, response
    and verdict. Rates come with 95 % Wilson intervals (``*_interval``) and their ``n``.
    """
    import time

    t0 = time.time()
    b, h, manifest = load_eval_sets(data_dir, benign, harmful)
    if limit:
        b, h = b[:limit], h[:limit]
    if model is None or tokenizer is None:
        model, tokenizer = load_model(model_dir, device=device, dtype=dtype)
    judge = judge or KeywordJudge()
    if max_new_tokens is None:
        answers = [r["answer"] for r in b if "answer" in r]
        longest = max((len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers), default=56)
        max_new_tokens = max(16, longest + 8)

    b_out = generate(model, tokenizer, [r["prompt"] for r in b], max_new_tokens, batch_size)
    h_out = generate(model, tokenizer, [r["prompt"] for r in h], max_new_tokens, batch_size)
    b_ref = judge.refusals([r["prompt"] for r in b], b_out)
    h_ref = judge.refusals([r["prompt"] for r in h], h_out)

    def group(r):
        return r.get("skill") or r.get("category") or "all"

    correct: Dict[str, List[bool]] = {}
    over: Dict[str, List[bool]] = {}
    for r, o, ref in zip(b, b_out, b_ref):
        if "answer" in r:
            correct.setdefault(group(r), []).append(normalize(o) == normalize(r["answer"]))
        over.setdefault(group(r), []).append(ref)
    refused: Dict[str, List[bool]] = {}
    for r, ref in zip(h, h_ref):
        refused.setdefault(group(r), []).append(ref)

    accuracy = {s: _rate(v) for s, v in correct.items()}
    result: Dict[str, Any] = {
        "model": os.fspath(model_dir) if model_dir is not None else None,
        "refusal_rate": _rate(h_ref),
        "refusal_interval": list(wilson_interval(int(sum(h_ref)), len(h_ref))),
        "over_refusal_rate": _rate(b_ref),
        "over_refusal_interval": list(wilson_interval(int(sum(b_ref)), len(b_ref))),
        "accuracy": accuracy,
        "accuracy_interval": {s: list(wilson_interval(int(sum(v)), len(v))) for s, v in correct.items()},
        "accuracy_n": {s: len(v) for s, v in correct.items()},
        "mean_accuracy": sum(accuracy.values()) / len(accuracy) if accuracy else None,
        "n_harmful": len(h),
        "n_benign": len(b),
        "refusal_by_skill": {s: _rate(v) for s, v in refused.items()},
        "over_refusal_by_skill": {s: _rate(v) for s, v in over.items()},
        "judge": getattr(judge, "name", type(judge).__name__),
        "max_new_tokens": max_new_tokens,
        "dtype": dtype,
    }
    if audit:
        rows = [{"set": "benign", **r, "output": o, "refused": bool(ref),
                 **({"correct": normalize(o) == normalize(r["answer"])} if "answer" in r else {})}
                for r, o, ref in zip(b, b_out, b_ref)]
        rows += [{"set": "harmful", **r, "output": o, "refused": bool(ref)} for r, o, ref in zip(h, h_out, h_ref)]
        from mergekit_safety.engine.data import write_jsonl

        os.makedirs(os.path.dirname(os.path.abspath(audit)), exist_ok=True)
        write_jsonl(audit, rows)
        result["audit"] = os.fspath(audit)
    if manifest and manifest.get("expert_skills"):
        ex = [s for s in manifest["expert_skills"] if s in accuracy]
        if ex:
            result["expert_skills"] = ex
            result["mean_expert_accuracy"] = sum(accuracy[s] for s in ex) / len(ex)
    result["samples"] = {
        "benign": [{"prompt": r["prompt"], "answer": r.get("answer"), "output": o}
                   for r, o in list(zip(b, b_out))[:3]],
        "harmful": [{"prompt": r["prompt"], "output": o} for r, o in list(zip(h, h_out))[:3]],
    }
    result["seconds"] = round(time.time() - t0, 2)
    return result


def format_table(results: Dict[str, Dict[str, Any]], skills: Optional[Sequence[str]] = None,
                 markdown: bool = False) -> str:
    """A table of several evaluations (name -> result dict); percentages."""
    if skills is None:
        skills = []
        for r in results.values():
            for s in r.get("accuracy", {}):
                if s not in skills:
                    skills.append(s)
    expert_mean = any("mean_expert_accuracy" in r for r in results.values())
    head = ["model", "refusal", "over-refusal", *skills, "mean expert" if expert_mean else "mean"]
    rows = []
    for name, r in results.items():
        if r.get("error"):
            rows.append([name, "error: " + str(r["error"])[:60]] + [""] * (len(head) - 2))
            continue
        acc = r.get("accuracy", {})
        mean = r.get("mean_expert_accuracy") if expert_mean else r.get("mean_accuracy")
        rows.append([name, f"{100 * r['refusal_rate']:.1f}", f"{100 * r['over_refusal_rate']:.1f}",
                     *[f"{100 * acc[s]:.1f}" if s in acc else "-" for s in skills],
                     f"{100 * mean:.1f}" if mean is not None else "-"])
    return render_table(head, rows, markdown)


def render_table(head: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
