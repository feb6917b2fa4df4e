"""Calibration benchmark: the data-driven locate steps vs plain passes of the same model.

    python benchmarks/bench_calibration.py [--size small] [--samples 64] [--length 128]
           [--batch-size 8] [--somf-size mini] [--somf-steps 6] [--repeats 2]
           [--json benchmarks/results/calibration.json]

Random-weight Llamas (fp32 on disk, cached under --workdir; the builder is shared with
bench_streaming.py). Each measured run executes in a fresh subprocess (peak RSS is its own),
times only the work (not interpreter start-up and imports), and is repeated ``--repeats``
times (best time, max RSS).

1. Activation statistics (:func:`mergekit_safety.engine.calibration.collect_statistics`: every Linear
   of every decoder layer, all tokens — Antidote's and SSAH's pass), **in-memory** and
   **streaming**, against a plain ``torch.no_grad`` forward of the same model over the same
   padded batches: the decoder (``model.model``, the same layers the statistics pass runs) and
   the full causal LM (with the output head). The reference is timed as load
   (``from_pretrained``) + forward, the way the statistics pass also loads its weights; the
   forward alone is reported too. Target: statistics time ≤ 1.3 × reference.
2. SOMF mask learning (:mod:`mergekit_safety.methods.somf.training`): one optimisation step — Concrete
   sample of every mask, masked fusion of every masked tensor (``core.fuse``), forward,
   DPO loss, backward to the logits, clip, AdamW — against a plain forward + backward of the
   same model (every weight trainable) on the same batch and the same loss, with a breakdown
   of the SOMF step.

Tokens/s counts every non-padding token pushed through the model. Benchmarks print ratios;
tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_streaming import MemoryProbe, build_in_child  # noqa: E402

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "tiny": (256, 704, 4, 8, 4, 8000),
    "mini": (512, 1408, 6, 8, 4, 16000),
    "small": (1024, 2816, 8, 16, 4, 32000),
}


def build(workdir: str, size: str, experts: int = 0) -> dict:
    hidden, intermediate, layers, heads, kv_heads, vocab = SIZES[size]
    shape = dict(hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads, vocab=vocab)
    base = build_in_child(path=os.path.join(workdir, f"{size}-base"), layers=layers, **shape)
    paths = {"base": base}
    for index in range(experts):
        paths[f"expert{index}"] = build_in_child(
            path=os.path.join(workdir, f"{size}-expert{index}"), layers=layers, seed=index + 1, perturb_of=base, **shape
        )
    return paths


def random_examples(samples: int, length: int, vocab: int, seed: int = 0):
    """Pre-encoded examples: random ids, lengths length/2 … length, the second half a response."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(samples):
        n = int(torch.randint(length // 2, length + 1, (1,), generator=generator))
        ids = torch.randint(4, vocab, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "response_mask": [0] * (n // 2) + [1] * (n - n // 2)})
    return examples


# --------------------------------------------------------------------------- runs (subprocess)


def run_statistics(spec: dict, streaming: bool) -> dict:
    import torch  # noqa: F401

    from mergekit_safety.engine.calibration import collect_statistics

    examples = random_examples(spec["samples"], spec["length"], spec["vocab"])
    with MemoryProbe() as probe:
        start = time.perf_counter()
        stats = collect_statistics(
            spec["model"], examples, modules="*", token_scope="all", batch_size=spec["batch_size"],
            streaming=streaming, progress=False,
        )
        elapsed = time.perf_counter() - start
    tokens = next(iter(stats.values())).count
    return {"seconds": elapsed, "tokens": tokens, **probe.report()}


def run_forward(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mergekit_safety.engine.data import batches

    examples = random_examples(spec["samples"], spec["length"], spec["vocab"])
    with MemoryProbe() as probe:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
        loaded = time.perf_counter()
        padded = list(batches(examples, spec["batch_size"], 0, padding_side="right"))
        tokens = 0
        with torch.no_grad():
            for batch in padded:
                model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                tokens += int(batch["attention_mask"].sum())
        decoder = time.perf_counter()
        with torch.no_grad():
            for batch in padded:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        full = time.perf_counter()
    return {
        "load_seconds": loaded - start,
        "decoder_seconds": decoder - loaded,
        "full_seconds": full - decoder,
        "seconds": decoder - start,  # load + decoder forward: the reference of the statistics pass
        "tokens": tokens,
        **probe.report(),
    }


def _somf_batch(spec: dict):
    import torch

    from mergekit_safety.engine.data import collate

    examples = random_examples(2 * spec["pairs"], spec["length"], spec["vocab"], seed=1)
    batch = collate(examples, 0)
    return batch["input_ids"], batch["attention_mask"], batch["response_mask"]


def run_somf(spec: dict) -> dict:
    import torch

    from mergekit_safety.methods.somf.method import SOMFSettings
    from mergekit_safety.methods.somf.training import FunctionalFusion, dpo_loss, sequence_logps

    torch.manual_seed(0)
    experts = spec["experts"]
    settings = SOMFSettings(
        preference_data="(benchmark)", modules=spec["modules"], weights=(1.0 / len(experts),) * len(experts),
        densities=(1.0,) * len(experts), steps=spec["steps"], batch_size=spec["pairs"],
    )
    ids, att, resp = _somf_batch(spec)
    n = spec["pairs"]
    with MemoryProbe() as probe:
        start = time.perf_counter()
        fusion = FunctionalFusion(spec["model"], experts, settings, progress=False)
        setup = time.perf_counter() - start
        with torch.no_grad():
            reference = sequence_logps(fusion.forward(None, ids, att), ids, resp)
        parameters = list(fusion.logits.values())
        optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(0)
        parts = {"masks_and_fusion": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        steps = []
        for step in range(spec["steps"] + 1):  # step 0 is a warm-up, not counted
            t0 = time.perf_counter()
            params = fusion.parameters_for(fusion.sample_masks(generator), exact=False)  # the training path
            t1 = time.perf_counter()
            logps = sequence_logps(fusion.forward(params, ids, att), ids, resp)
            loss, _ = dpo_loss(logps[:n], logps[n:], reference[:n], reference[n:], settings.beta)
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            t4 = time.perf_counter()
            if step:
                for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    parts[key] += value
                steps.append(t4 - t0)
    count = len(steps)
    return {
        "seconds": min(steps),
        "mean_step_seconds": sum(steps) / count,
        "breakdown": {k: v / count for k, v in parts.items()},
        "setup_seconds": setup,
        "masked_elements": fusion.masked_elements(),
        "tokens": int(att.sum()),
        **probe.report(),
    }


def run_plain_step(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mergekit_safety.methods.somf.training import sequence_logps

    ids, att, resp = _somf_batch(spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    n = spec["pairs"]
    with MemoryProbe() as probe:
        steps = []
        for step in range(spec["steps"] + 1):
            t0 = time.perf_counter()
            logps = sequence_logps(model(input_ids=ids, attention_mask=att).logits, ids, resp)
            loss = -torch.nn.functional.logsigmoid(0.1 * (logps[:n] - logps[n:])).mean()
            model.zero_grad(set_to_none=True)
            loss.backward()
            if step:
                steps.append(time.perf_counter() - t0)
    return {"seconds": min(steps), "mean_step_seconds": sum(steps) / len(steps), "tokens": int(att.sum()), **probe.report()}


def run_one(kind: str, spec_path: str) -> dict:
    import logging

    logging.disable(logging.WARNING)
    with open(spec_path) as handle:
        spec = json.load(handle)
    # every run pays the same imports before its timer starts (transformers imports lazily)
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    import mergekit_safety.engine.calibration  # noqa: F401
    import mergekit_safety.engine.data  # noqa: F401

    if kind == "forward":
        return run_forward(spec)
    if kind == "stats_memory":
        return run_statistics(spec, streaming=False)
    if kind == "stats_streaming":
        return run_statistics(spec, streaming=True)
    if kind == "somf_step":
        return run_somf(spec)
    if kind == "plain_step":
        return run_plain_step(spec)
    raise ValueError(kind)


def measure(kind: str, spec: dict, workdir: str, repeats: int) -> dict:
    spec_path = os.path.join(workdir, f"spec-{kind}.json")
    with open(spec_path, "w") as handle:
        json.dump(spec, handle)
    runs = []
    for _ in range(repeats):
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--run-one", kind, spec_path],
            capture_output=True, text=True, check=False, env={**os.environ, "TQDM_DISABLE": "1"},
        )
        if result.returncode != 0:
            raise RuntimeError(f"{kind} failed:\n{result.stderr[-3000:]}")
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    best["runs"] = runs
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--somf-size", default="mini", choices=sorted(SIZES))
    parser.add_argument("--somf-experts", type=int, default=3)
    parser.add_argument("--somf-pairs", type=int, default=None,
                        help="preference pairs per step (2× sequences); default: SOMF's default batch_size (16)")
    parser.add_argument("--somf-length", type=int, default=64)
    parser.add_argument("--somf-steps", type=int, default=6)
    parser.add_argument("--somf-modules", default="linear")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default="statistics,somf")
    parser.add_argument("--workdir", default=os.path.join("benchmarks", ".work", "calibration"))
    parser.add_argument("--json", default=os.path.join("benchmarks", "results", "calibration.json"))
    parser.add_argument("--run-one", nargs=2, metavar=("KIND", "SPEC"))
    args = parser.parse_args()
    if args.somf_pairs is None:  # the step the method takes by default, not a toy batch
        from mergekit_safety.methods.somf.method import SOMFSettings

        args.somf_pairs = int(SOMFSettings.parameter("batch_size").default)
    if args.run_one:
        print(json.dumps(run_one(*args.run_one)))
        return

    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    only = set(args.only.split(","))
    results, ratios = {}, []
    header = f"{os.cpu_count()} CPU cores, fp32"
    if "statistics" in only:
        paths = build(workdir, args.size)
        spec = {"model": paths["base"], "samples": args.samples, "length": args.length,
                "batch_size": args.batch_size, "vocab": SIZES[args.size][5]}
        for kind in ("forward", "stats_memory", "stats_streaming"):
            results[kind] = measure(kind, spec, workdir, args.repeats)
            r = results[kind]
            print(f"  {kind}: {r['seconds']:.2f} s, {r['tokens']} tokens, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        ref = results["forward"]
        for kind in ("stats_memory", "stats_streaming"):
            seconds = results[kind]["seconds"]
            ratios += [
                {"ours": kind, "reference": "load + decoder forward", "time_ratio": seconds / ref["seconds"], "target": 1.3},
                {"ours": kind, "reference": "decoder forward only", "time_ratio": seconds / ref["decoder_seconds"], "target": None},
                {"ours": kind, "reference": "full LM forward only", "time_ratio": seconds / ref["full_seconds"], "target": None},
            ]
        header += f"; statistics: size {args.size}, {args.samples} samples × ≤{args.length} tokens, batch {args.batch_size}"
    if "somf" in only:
        paths = build(workdir, args.somf_size, experts=args.somf_experts)
        spec = {"model": paths["base"], "experts": [paths[f"expert{i}"] for i in range(args.somf_experts)],
                "pairs": args.somf_pairs, "length": args.somf_length, "steps": args.somf_steps,
                "modules": args.somf_modules, "vocab": SIZES[args.somf_size][5]}
        for kind in ("plain_step", "somf_step"):
            results[kind] = measure(kind, spec, workdir, args.repeats)
            r = results[kind]
            print(f"  {kind}: {r['seconds']:.3f} s/step, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        ratios.append({"ours": "somf_step", "reference": "plain forward + backward", "target": None,
                       "time_ratio": results["somf_step"]["seconds"] / results["plain_step"]["seconds"]})
        header += (f"; SOMF: size {args.somf_size}, {args.somf_experts} experts, modules {args.somf_modules}, "
                   f"{args.somf_pairs} pairs ({2 * args.somf_pairs} sequences) × ≤{args.somf_length} tokens")

    print(f"\n{header}")
    for kind in ("forward", "stats_memory", "stats_streaming"):
        if kind in results:
            r = results[kind]
            print(f"{kind:<16} {r['seconds']:8.2f} s {r['tokens'] / r['seconds']:9.0f} tokens/s  peak RSS {r['peak_rss_mb']:6.0f} MB")
    if "forward" in results:
        r = results["forward"]
        print(f"  (reference parts: load {r['load_seconds']:.2f} s, decoder forward {r['decoder_seconds']:.2f} s, "
              f"full LM forward {r['full_seconds']:.2f} s)")
    if "somf_step" in results:
        r = results["somf_step"]
        parts = ", ".join(f"{k} {v:.3f} s" for k, v in r["breakdown"].items())
        print(f"somf step: {r['seconds']:.3f} s ({parts}); plain step {results['plain_step']['seconds']:.3f} s")
    print(f"\n{'ours':<16} {'reference':<26} {'time ×':>7} {'target':>7}")
    for row in ratios:
        target = f"{row['target']:.2f}" if row["target"] else ""
        print(f"{row['ours']:<16} {row['reference']:<26} {row['time_ratio']:7.2f} {target:>7}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"settings": vars(args), "cpu_count": os.cpu_count(), "results": results, "ratios": ratios}, handle, indent=2)
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
