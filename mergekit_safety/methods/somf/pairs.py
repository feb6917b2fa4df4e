"""SOMF's preference pairs (and utility data) built from the user's own models.

A merger has an aligned base model, fine-tuned experts and — from ``mergekit-safety data`` —
a list of real harmful prompts, but no DPO data set. This module makes one on calibration
prompts:

* **chosen** — the aligned base model's greedy answer, kept where the refusal judge calls it a
  refusal (the safe behaviour the merge should keep);
* **rejected** — the *unmasked fusion*'s greedy answer (the merge without safety restoration,
  built tensor by tensor with the merge's own kernel), kept where the judge says it complies
  (the behaviour the mask must remove);
* a pair is written for every prompt where both hold.

Utility data (optional, for SOMF's utility term): the unmasked fusion's own answers on benign
prompts, kept where the judge does not call them refusals — what the fusion does well and the
mask should not change.

Generation is greedy and batched (shortest prompts first), with a progress bar; every finished
batch is appended to a generation cache keyed by the models' fingerprints, the fusion settings,
the prompts' sha256 and the generation settings, so an interrupted run resumes where it
stopped, and a second run with the same inputs generates nothing. The output files are written
atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

#: fewer pairs than this cannot teach a mask anything reliable: refused
MIN_PAIRS = 8


class PairsError(ValueError):
    """Preference pairs cannot be built (too few refusals or compliances; the message says)."""


def read_prompts(path: str, limit: int = 0) -> List[Dict[str, Any]]:
    """Prompts of a JSONL file (key ``prompt``; other keys, e.g. ``category``, are kept)."""
    from mergekit_safety.engine.data import read_jsonl

    records = read_jsonl(path, ("prompt",), nonempty=("prompt",))
    return records[:limit] if limit else records


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def fused_model(base_dir: str, expert_dirs: Sequence[str], fuse_kwargs: Mapping[str, Any], seed: Optional[int],
                dtype: str = "float32", device: str = "cpu", progress: bool = True):
    """The unmasked fusion as an in-memory transformers model (tensor by tensor, the merge's
    own kernel and per-tensor seeding: the model a plain merge would write)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from mergekit_safety.engine.calibration import SafetensorsSource
    from mergekit_safety.engine.vocabulary import aligned
    from mergekit_safety.fusion.sources import FusedSource

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    if not expert_dirs:
        return model.to(device).eval()
    base = SafetensorsSource(base_dir)
    source = FusedSource(base, [aligned(SafetensorsSource(d), base) for d in expert_dirs], fuse_kwargs, seed=seed)
    state = model.state_dict()
    with torch.no_grad():
        for name in tqdm(sorted(state), desc="pairs: unmasked fusion", disable=not progress, leave=False):
            if source.has(name) or name == "lm_head.weight":
                state[name].copy_(source.get(name).to(state[name].dtype))
    source.release()
    return model.to(device).eval()


class GenerationCache:
    """Greedy answers of one model on a prompt list, appended batch by batch (resumable)."""

    def __init__(self, path: str):
        self.path = path
        self.done: Dict[str, str] = {}
        if os.path.exists(path):
            valid = []
            with open(path, "r", encoding="utf-8") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a line cut by an interruption: regenerate from there
                    if not line.endswith("\n"):
                        break
                    valid.append(line)
                    self.done[record["prompt"]] = record["response"]
            with open(path, "w", encoding="utf-8") as handle:  # drop what an interruption cut
                handle.writelines(valid)

    def answer(self, model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
               progress: bool, description: str) -> List[str]:
        from tqdm.auto import tqdm

        from mergekit_safety.engine.generation import generate

        todo = [p for p in dict.fromkeys(prompts) if p not in self.done]
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        bar = tqdm(total=len(todo), desc=description, disable=not progress or not todo, leave=False)
        with open(self.path, "a", encoding="utf-8") as handle:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                answers = generate(model, tokenizer, chunk, max_new_tokens=max_new_tokens, batch_size=batch_size)
                for prompt, response in zip(chunk, answers):
                    self.done[prompt] = response
                    handle.write(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n")
                handle.flush()
                bar.update(len(chunk))
        bar.close()
        return [self.done[p] for p in prompts]


def _in(folder: str, name: str) -> str:
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def build_pairs(
    base_dir: str,
    expert_dirs: Sequence[str],
    harmful_prompts: str,
    out_dir: str,
    *,
    fuse_kwargs: Mapping[str, Any],
    seed: Optional[int] = None,
    benign_prompts: str = "",
    judge: Any = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_prompts: int = 0,
    cache_dir: Optional[str] = None,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
) -> Dict[str, Any]:
    """Write ``out_dir/pairs.jsonl`` (and ``utility.jsonl`` with ``benign_prompts``); return a
    report with the counts. Raises :class:`PairsError` below :data:`MIN_PAIRS` pairs."""
    from mergekit_safety.engine.data import file_sha256, write_jsonl
    from mergekit_safety.engine.generation import load_model
    from mergekit_safety.fusion.artifacts import model_fingerprint
    from mergekit_safety.judge import make_judge

    started = time.time()
    judge = judge or make_judge("keyword")
    prompts = read_prompts(harmful_prompts, max_prompts)
    texts = [r["prompt"] for r in prompts]
    cache_dir = cache_dir or os.path.join(out_dir, "generations")
    generation = {"max_new_tokens": max_new_tokens, "dtype": dtype}

    aligned_key = _digest("aligned", model_fingerprint(base_dir), generation)
    model, tokenizer = load_model(base_dir, device=device, dtype=dtype)
    chosen = GenerationCache(os.path.join(cache_dir, f"aligned-{aligned_key}.jsonl")).answer(
        model, tokenizer, texts, max_new_tokens, batch_size, progress, "pairs: aligned answers")
    del model
    refused = judge.refusals(texts, chosen)

    fusion_key = _digest("fusion", model_fingerprint(base_dir), [model_fingerprint(d) for d in expert_dirs],
                         {k: str(v) for k, v in fuse_kwargs.items()}, seed, generation)
    model = fused_model(base_dir, expert_dirs, fuse_kwargs, seed, dtype=dtype, device=device, progress=progress)
    fusion_cache = GenerationCache(os.path.join(cache_dir, f"fusion-{fusion_key}.jsonl"))
    rejected = fusion_cache.answer(model, tokenizer, texts, max_new_tokens, batch_size, progress, "pairs: fusion answers")
    fusion_refused = judge.refusals(texts, rejected)

    pairs = []
    for record, good, bad, is_refusal, fusion_is_refusal in zip(prompts, chosen, rejected, refused, fusion_refused):
        if is_refusal and not fusion_is_refusal and good.strip() and bad.strip() and good.strip() != bad.strip():
            pairs.append({"prompt": record["prompt"], "chosen": good, "rejected": bad,
                          **({"category": record["category"]} if "category" in record else {})})
    report: Dict[str, Any] = {
        "prompts": len(texts),
        "aligned_refusals": int(sum(refused)),
        "fusion_compliances": int(len(texts) - sum(fusion_refused)),
        "pairs": len(pairs),
        "judge": getattr(judge, "name", type(judge).__name__),
        "harmful_prompts_sha256": file_sha256(harmful_prompts),
        "max_new_tokens": max_new_tokens,
    }
    if len(pairs) < MIN_PAIRS:
        raise PairsError(
            f"{harmful_prompts}: only {len(pairs)} preference pairs from {len(texts)} prompts (the aligned "
            f"model refused {report['aligned_refusals']}, the unmasked fusion complied with "
            f"{report['fusion_compliances']}); at least {MIN_PAIRS} are needed — give more prompts, or "
            "check that the base model is the aligned one"
        )
    write_jsonl(_in(out_dir, "pairs.jsonl"), pairs)

    if benign_prompts:
        benign = read_prompts(benign_prompts, max_prompts)
        benign_texts = [r["prompt"] for r in benign]
        answers = fusion_cache.answer(model, tokenizer, benign_texts, max_new_tokens, batch_size, progress,
                                      "pairs: fusion utility answers")
        flags = judge.refusals(benign_texts, answers)
        utility = [{"prompt": p, "response": a} for p, a, r in zip(benign_texts, answers, flags) if a.strip() and not r]
        if not utility:
            raise PairsError(f"{benign_prompts}: the unmasked fusion refused or left empty every benign prompt")
        write_jsonl(_in(out_dir, "utility.jsonl"), utility)
        report.update(benign_prompts=len(benign_texts), utility_records=len(utility),
                      benign_prompts_sha256=file_sha256(benign_prompts))
    report["seconds"] = round(time.time() - started, 1)
    with open(os.path.join(out_dir, "pairs_report.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    logger.info("pairs: %s", report)
    return report
