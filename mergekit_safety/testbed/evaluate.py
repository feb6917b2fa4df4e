"""Stage ``eval``: greedy generation, exact match per skill, refusal rates with Wilson intervals.

The refusal judge is ``mergekit_safety.judge``'s keyword judge (its accuracy is measured in
docs/judge.md); the result JSON names it, and the intervals are that module's Wilson intervals.
Every response is written with its verdict to a JSONL file for audit.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Sequence

from mergekit_safety.judge import make_judge, wilson_interval

from .skills import correct

# the package's keyword judge (its accuracy is measured in docs/judge.md), named in every result
JUDGE_NAME = "mergekit_safety.judge:keyword"


def rate(flags: Sequence[bool]) -> Dict[str, Any]:
    k, n = sum(bool(f) for f in flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return {"rate": round(k / n, 4) if n else None, "k": k, "n": n, "ci95": [round(lo, 4), round(hi, 4)]}


def load_model(base: str, adapter: str = None, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(device).eval(), tokenizer


def evaluate(model, tokenizer, data: Dict[str, List[Dict[str, Any]]], skills: Sequence[str], audit_path: str,
             max_new_tokens: int = 32, batch_size: int = 32, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """``data``: ``harmful_eval``, ``benign_eval`` and ``skill_eval_<skill>`` record lists."""
    from .chat import generate

    judge = make_judge("keyword").refusals
    started = time.time()
    result: Dict[str, Any] = {"judge": JUDGE_NAME, "accuracy": {}, "skill_refusal": {}}
    audit: List[Dict[str, Any]] = []

    def run(name, records, tokens):
        t = time.time()
        prompts = [r["prompt"] for r in records]
        answers = generate(model, tokenizer, prompts, max_new_tokens=tokens, batch_size=batch_size)
        verdicts = judge(prompts, answers)
        log(f"    {name}: {len(prompts)} prompts in {time.time() - t:.0f} s")
        return answers, verdicts

    answers, verdicts = run("harmful_eval", data["harmful_eval"], max_new_tokens)
    result["refusal"] = rate(verdicts)
    audit += [{"set": "harmful_eval", "prompt": r["prompt"], "category": r.get("category"), "response": a, "refusal": v}
              for r, a, v in zip(data["harmful_eval"], answers, verdicts)]
    by_cat: Dict[str, List[bool]] = {}
    for r, v in zip(data["harmful_eval"], verdicts):
        by_cat.setdefault(r.get("category", "?"), []).append(v)
    result["refusal_by_category"] = {c: rate(v) for c, v in sorted(by_cat.items())}
    answers, verdicts = run("benign_eval", data["benign_eval"], max_new_tokens)
    result["over_refusal"] = rate(verdicts)
    audit += [{"set": "benign_eval", "prompt": r["prompt"], "response": a, "refusal": v}
              for r, a, v in zip(data["benign_eval"], answers, verdicts)]
    for skill in skills:
        records = data[f"skill_eval_{skill}"]
        answers, verdicts = run(skill, records, max_new_tokens)
        ok = [correct(a, r["response"]) for a, r in zip(answers, records)]
        result["accuracy"][skill] = rate(ok)
        result["skill_refusal"][skill] = rate(verdicts)
        audit += [{"set": skill, "prompt": r["prompt"], "reference": r["response"], "response": a, "correct": c,
                   "refusal": v} for r, a, c, v in zip(records, answers, ok, verdicts)]
    result["eval_seconds"] = round(time.time() - started, 1)
    os.makedirs(os.path.dirname(audit_path), exist_ok=True)
    with open(audit_path + ".tmp", "w", encoding="utf-8") as handle:
        for row in audit:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(audit_path + ".tmp", audit_path)
    return result
