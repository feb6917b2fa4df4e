"""Merge benchmark: our methods vs mergekit's built-ins and the I/O floor, as ratios.

    python benchmarks/bench_merge.py [--size small|medium|large] [--experts 3] [--repeats 2]
           [--json benchmarks/results/merge.json] [--scaling]

Builds random Llama checkpoints (bf16; cached under --workdir), then runs each merge in a
fresh subprocess (so peak RSS is that merge's own) and times the merge itself, excluding
interpreter start-up and imports. Reported per run: wall time, peak RSS, and the ratios to
mergekit's task_arithmetic / ties on the same inputs, plus the I/O floor (read every input
tensor once and write the output once). Benchmarks print; tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "tiny": (256, 704, 4, 8, 4, 8000),
    "smollm2": (576, 1536, 30, 9, 3, 49152),  # the shape of SmolLM2-135M, the real testbed's model
    "small": (1024, 2816, 8, 16, 4, 32000),  # ~200M parameters, the size of the shared notes
    "medium": (2048, 5632, 8, 16, 4, 32000),  # ~540M parameters, 1.1 GB per model in bf16
    "large": (2048, 5632, 16, 16, 4, 32000),  # ~940M parameters, 1.9 GB per model
}


def build_models(workdir: str, size: str, experts: int) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads, kv_heads, vocab = SIZES[size]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (intermediate, hidden),
                p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    paths = {}
    generator = torch.Generator().manual_seed(0)
    base_state = None
    # "unaligned" (the data-free methods' θ_U) comes last, so the experts stay as they were
    for index, name in enumerate(["base"] + [f"expert{i}" for i in range(experts)] + ["unaligned"]):
        path = os.path.join(workdir, f"{size}-{name}")
        paths[name] = path
        if os.path.exists(os.path.join(path, "model.safetensors")):
            continue
        os.makedirs(path, exist_ok=True)
        if base_state is None:
            base_state = {k: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
        state = (
            base_state
            if index == 0
            else {k: (v.float() + torch.randn(v.shape, generator=generator) * 0.002).to(torch.bfloat16) for k, v in base_state.items()}
        )
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(path)
    return paths


def config_text(method: str, paths: dict, experts: int, extra: str = "", density: bool = False) -> str:
    models = "\n".join(
        f"  - model: {paths[f'expert{i}']}\n    parameters:\n      weight: 0.5" + ("\n      density: 0.2" if density else "")
        for i in range(experts)
    )
    return (
        f"merge_method: {method}\nbase_model: {paths['base']}\ndtype: bfloat16\nmodels:\n{models}\n"
        + (f"parameters:\n{extra}" if extra else "")
    )


def write_keep_mask(path: str, paths: dict, experts: int) -> None:
    import torch

    from mergekit_safety.fusion.artifacts import ArtifactMetadata, ModelIdentity, tensor_key, write_artifact
    from mergekit_safety.plugin.checks import safetensors_shapes

    if os.path.exists(path):
        return
    shapes = safetensors_shapes(paths["base"])
    tensors = {tensor_key("keep", n): torch.ones(s, dtype=torch.bool) for n, s in shapes.items() if len(s) == 2}
    write_artifact(
        path,
        tensors,
        ArtifactMetadata(
            method="masked_fusion",
            base=ModelIdentity.of(paths["base"]),
            experts=[ModelIdentity.of(paths[f"expert{i}"]) for i in range(experts)],
        ),
    )


def write_method_artifacts(workdir: str, paths: dict, experts: int, tag: str) -> dict:
    """Synthetic but valid artifacts for the merge-time cost of somf / ssah / antidote.

    The locate step is benchmarked elsewhere (bench_calibration, bench_streaming); here only
    the merge reads an artifact. Each artifact is recorded with the method's own settings for
    the benchmark config (so the merge accepts it) and filled with seeded random content:
    SOMF logits for every Linear weight, SSAH unit z-scores (labels and protected set derived
    as usual), Antidote `post_keep` masks with α = 0.05 per row.
    """
    import torch

    from mergekit_safety.fusion.artifacts import tensor_key, write_artifact
    from mergekit_safety.plugin.checks import safetensors_shapes
    from mergekit_safety.plugin.config import request_from_config
    from mergekit_safety.methods.antidote import top_alpha_per_row
    from mergekit_safety.methods.somf.method import store_logits
    from mergekit_safety.methods.ssah.method import UnitScores, write_scores_artifact
    from mergekit_safety.methods.ssah.units import UnitLayout

    data = os.path.join(workdir, "bench-data.jsonl")
    if not os.path.exists(data):
        with open(data, "w") as handle:
            for i in range(8):
                handle.write(json.dumps({"prompt": f"p{i}", "response": f"r{i}", "chosen": "no", "rejected": f"r{i}"}) + "\n")
    generator = torch.Generator().manual_seed(0)
    shapes = safetensors_shapes(paths["base"])
    linear = {n: s for n, s in shapes.items() if len(s) == 2 and "embed_tokens" not in n}
    configs = {}

    def config(method, extra):
        path = os.path.join(workdir, f"bench-{tag}-{method}.yml")
        with open(path, "w") as handle:
            handle.write(config_text(method, paths, experts, extra))
        configs[method] = path
        return path

    mask = os.path.join(workdir, f"bench-{tag}-somf.safetensors")
    path = config("somf", f"  preference_data: {data}\n  mask: {mask}\n")
    if not os.path.exists(mask):
        method, request = request_from_config(path)
        record = method.artifact_record(request)
        # stored as the method stores them (logits_dtype, bfloat16 by default)
        dtype = getattr(torch, record.settings.get("logits_dtype", "bfloat16"))
        logits = {tensor_key("logits", n): store_logits(torch.randn(s, generator=generator), dtype) for n, s in linear.items()}
        write_artifact(mask, logits, record)

    mask = os.path.join(workdir, f"bench-{tag}-ssah.safetensors")
    config("ssah", f"  safety_data: {data}\n  utility_data: {data}\n  mask: {mask}\n")
    if not os.path.exists(mask):
        layout = UnitLayout.from_model_dir(paths["base"])
        z = lambda: (  # noqa: E731
            torch.randn(layout.num_layers, layout.num_heads, generator=generator),
            torch.randn(layout.num_layers, layout.intermediate_size, generator=generator),
        )
        write_scores_artifact(mask, UnitScores.from_scores(layout, z(), z()), paths["base"],
                              {"safety_data": data, "utility_data": data})

    mask = os.path.join(workdir, f"bench-{tag}-antidote.safetensors")
    path = config("antidote", f"  harmful_data: {data}\n  mask: {mask}\n")
    if not os.path.exists(mask):
        method, request = request_from_config(path)
        record = method.artifact_record(request)
        keep = {
            tensor_key("post_keep", n): ~top_alpha_per_row(torch.rand(s, generator=generator), 0.05)
            for n, s in linear.items() if "lm_head" not in n
        }
        write_artifact(mask, keep, record)
    return configs


# --------------------------------------------------------------------------- one run


def run_one(kind: str, config_path: str, out: str) -> dict:
    """Executed in a fresh subprocess: imports first, then the timed work."""
    import resource

    import yaml

    if kind == "io_floor":
        from safetensors import safe_open
        from safetensors.torch import save_file

        with open(config_path) as handle:
            raw = yaml.safe_load(handle)
        inputs = [raw["base_model"]] + [m["model"] for m in raw["models"]]
        start = time.perf_counter()
        handles = [safe_open(os.path.join(p, "model.safetensors"), framework="pt") for p in inputs]
        output = {}
        for name in handles[0].keys():
            tensors = [h.get_tensor(name) for h in handles]
            output[name] = tensors[-1].clone()
            del tensors
        os.makedirs(out, exist_ok=True)
        save_file(output, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        elapsed = time.perf_counter() - start
    else:
        import mergekit.merge_methods  # noqa: F401  registration
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        with open(config_path) as handle:
            config = MergeConfiguration.model_validate(yaml.safe_load(handle))
        # --lora-merge-cache: adapters (``base+adapter`` references) merged once, as the testbed does
        options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0,
                               lora_merge_cache=os.environ.get("BENCH_MERGE_LORA_CACHE") or None)
        start = time.perf_counter()
        run_merge(config, out, options=options)
        elapsed = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": elapsed, "peak_rss_mb": peak_kib / 1024}


def measure(kind: str, config_path: str, out: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        # a fresh artifact cache per run: a data-free method's cosines are part of its merge
        with tempfile.TemporaryDirectory() as cache:
            result = subprocess.run(
                [sys.executable, __file__, "--run-one", kind, config_path, out],
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "MERGEKIT_SAFETY_CACHE": cache},
            )
        if result.returncode != 0:
            raise RuntimeError(f"{kind} failed:\n{result.stderr[-3000:]}")
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    return {"seconds": best["seconds"], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=os.path.join("benchmarks", ".work"))
    parser.add_argument("--json", default=os.path.join("benchmarks", "results", "merge.json"))
    parser.add_argument("--run-one", nargs=3, metavar=("KIND", "CONFIG", "OUT"))
    parser.add_argument("--only", default="", help="comma-separated run labels (or their first words, e.g. 'io_floor,mergekit task_arithmetic,somf')")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="instead: masked_fusion vs mergekit task_arithmetic time for 1, 2, 4, 8 experts "
        "(at --size) and for the sizes tiny/small/medium (at 3 experts)",
    )
    parser.add_argument("--lora-merge-cache", default="", help="with --configs: mergekit's LoRA merge cache")
    configs_help = ("instead: time these mergekit YAMLs (comma-separated; e.g. a testbed's safety/*.yml) in one run, "
                    "each in a fresh process with a fresh artifact cache, as ratios to the first")
    parser.add_argument("--configs", default="", help=configs_help)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(*args.run_one)))
        return
    if args.configs:
        if args.lora_merge_cache:
            os.environ["BENCH_MERGE_LORA_CACHE"] = os.path.abspath(args.lora_merge_cache)
        configs(args)
        return
    if args.scaling:
        scaling(args)
        return

    os.makedirs(args.workdir, exist_ok=True)
    paths = build_models(args.workdir, args.size, args.experts)
    mask = os.path.join(args.workdir, f"{args.size}-{args.experts}-keep.safetensors")
    write_keep_mask(mask, paths, args.experts)
    runs = {
        "io_floor": ("io_floor", config_text("task_arithmetic", paths, args.experts)),
        "mergekit task_arithmetic": ("merge", config_text("task_arithmetic", paths, args.experts)),
        "masked_fusion task_arithmetic": ("merge", config_text("masked_fusion", paths, args.experts)),
        "masked_fusion task_arithmetic + mask": (
            "merge",
            config_text("masked_fusion", paths, args.experts, f"  mask: {mask}\n"),
        ),
        "mergekit ties": ("merge", config_text("ties", paths, args.experts, density=True)),
        "masked_fusion ties + mask": (
            "merge",
            config_text("masked_fusion", paths, args.experts, f"  backbone: ties\n  mask: {mask}\n", density=True),
        ),
        "masked_fusion ties fast": (
            "merge",
            config_text("masked_fusion", paths, args.experts, "  backbone: ties\n  ties_selection: fast\n", density=True),
        ),
    }
    # the data-free methods: their whole cost, cosines from the models included (fresh cache)
    unaligned = f"  unaligned_model: {paths['unaligned']}\n"
    runs["resta"] = ("merge", config_text("resta", paths, args.experts, unaligned))
    runs["safe_lora"] = ("merge", config_text("safe_lora", paths, args.experts, unaligned))
    runs["safemerge"] = ("merge", config_text("safemerge", paths, args.experts, unaligned))
    methods = write_method_artifacts(args.workdir, paths, args.experts, f"{args.size}-{args.experts}")
    for method, path in methods.items():
        with open(path) as handle:
            runs[f"{method} task_arithmetic + artifact"] = ("merge", handle.read())
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        runs = {k: v for k, v in runs.items() if any(w == k or k.startswith(w + " ") for w in wanted)}
    results = {}
    for label, (kind, text) in runs.items():
        config_path = os.path.join(args.workdir, label.replace(" ", "_").replace("+", "plus") + ".yml")
        with open(config_path, "w") as handle:
            handle.write(text)
        results[label] = measure(kind, config_path, os.path.join(args.workdir, "out"), args.repeats)
        print(f"  {label}: {results[label]['seconds']:.2f} s, peak RSS {results[label]['peak_rss_mb']:.0f} MB", flush=True)

    def ratio(a, b, key):
        return results[a][key] / results[b][key]

    table = [
        ("masked_fusion task_arithmetic", "mergekit task_arithmetic", 1.25),
        ("masked_fusion task_arithmetic + mask", "mergekit task_arithmetic", 1.25),
        ("somf task_arithmetic + artifact", "mergekit task_arithmetic", 1.25),
        ("ssah task_arithmetic + artifact", "mergekit task_arithmetic", 1.25),
        ("antidote task_arithmetic + artifact", "mergekit task_arithmetic", 1.25),
        ("resta", "mergekit task_arithmetic", 1.5),
        ("safe_lora", "mergekit task_arithmetic", 1.5),
        ("safemerge", "mergekit task_arithmetic", 1.5),
        ("masked_fusion ties + mask", "mergekit ties", 1.25),
        ("masked_fusion ties fast", "mergekit ties", 0.33),
        ("masked_fusion task_arithmetic + mask", "io_floor", 1.5),
        ("mergekit task_arithmetic", "io_floor", None),
    ]
    table = [row for row in table if row[0] in results and row[1] in results]
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"\nmodel size {args.size}, base + {args.experts} experts, bf16, {os.cpu_count()} CPU cores, "
          f"OMP_NUM_THREADS {threads}")
    print(f"{'ours':<40} {'reference':<26} {'time ×':>7} {'RSS ×':>7} {'target':>7}")
    summary = []
    for ours, reference, target in table:
        t, m = ratio(ours, reference, "seconds"), ratio(ours, reference, "peak_rss_mb")
        print(f"{ours:<40} {reference:<26} {t:7.2f} {m:7.2f} {'—' if target is None else f'{target:.2f}':>7}")
        summary.append({"ours": ours, "reference": reference, "time_ratio": t, "rss_ratio": m, "target": target})
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"size": args.size, "experts": args.experts, "omp_num_threads": threads, "results": results,
                   "ratios": summary}, handle, indent=2)
    print(f"\nwritten {args.json}")


def scaling(args) -> None:
    os.makedirs(args.workdir, exist_ok=True)
    rows = []

    def point(size, experts):
        paths = build_models(args.workdir, size, experts)
        out = {}
        for method in ("task_arithmetic", "masked_fusion"):
            config_path = os.path.join(args.workdir, f"scaling-{size}-{experts}-{method}.yml")
            with open(config_path, "w") as handle:
                handle.write(config_text(method, paths, experts))
            out[method] = measure("merge", config_path, os.path.join(args.workdir, "out"), args.repeats)
        row = {
            "size": size,
            "experts": experts,
            "mergekit_seconds": out["task_arithmetic"]["seconds"],
            "ours_seconds": out["masked_fusion"]["seconds"],
            "ratio": out["masked_fusion"]["seconds"] / out["task_arithmetic"]["seconds"],
            "ours_peak_rss_mb": out["masked_fusion"]["peak_rss_mb"],
        }
        rows.append(row)
        print(
            f"  {size:<7} experts {experts}: mergekit {row['mergekit_seconds']:.2f} s, ours "
            f"{row['ours_seconds']:.2f} s (×{row['ratio']:.2f}), peak RSS {row['ours_peak_rss_mb']:.0f} MB",
            flush=True,
        )

    for experts in (1, 2, 4, 8):
        point(args.size, experts)
    for size in ("tiny", "small", "medium"):
        if size != args.size:
            point(size, 3)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    target = args.json.replace(".json", "-scaling.json")
    with open(target, "w") as handle:
        json.dump(rows, handle, indent=2)
    print(f"written {target}")


def configs(args) -> None:
    """Given YAMLs (a real model's merges) against the first, in one run."""
    paths = [p.strip() for p in args.configs.split(",") if p.strip()]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for path in paths:
            label = os.path.splitext(os.path.basename(path))[0]
            results[label] = measure("merge", path, os.path.join(scratch, "out"), args.repeats)
            print(f"  {label}: {results[label]['seconds']:.2f} s, peak RSS {results[label]['peak_rss_mb']:.0f} MB", flush=True)
    labels = list(results)
    reference = labels[0]
    print(f"\n{'config':<28} {'time ×':>7} {'RSS ×':>7}   (reference {reference}, {os.cpu_count()} CPU cores)")
    summary = []
    for label in labels[1:]:
        t = results[label]["seconds"] / results[reference]["seconds"]
        m = results[label]["peak_rss_mb"] / results[reference]["peak_rss_mb"]
        print(f"{label:<28} {t:7.2f} {m:7.2f}")
        summary.append({"ours": label, "reference": reference, "time_ratio": t, "rss_ratio": m})
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"configs": paths, "results": results, "ratios": summary}, handle, indent=2)
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()

