"""Streaming benchmark: peak memory of the locate step (the calibration pass) vs model size.

    python benchmarks/bench_streaming.py [--sizes 1,4,10,14] [--dtype float32]
           [--samples 32] [--length 128] [--runs engine,ssah,antidote]
           [--json benchmarks/results/streaming.json]

Builds random-weight Llamas (hidden 2048, intermediate 5632, 16 heads / 4 K/V heads, vocab
32000; the sizes are numbers of decoder layers; fp32 on disk by default, sharded like a HF
checkpoint, with a word-level tokenizer; cached under --workdir) and runs, each in a fresh
subprocess:

* ``engine``: :func:`mergekit_safety.engine.calibration.collect_statistics` in streaming mode, every
  Linear of every decoder layer (what Antidote runs on one model);
* ``ssah``: ``mergekit-safety locate`` of an SSAH config (two calibration passes, safety and
  utility, then unit scores and labels);
* ``antidote``: ``mergekit-safety locate`` of an Antidote config with one expert
  (``apply_to: fusion``: the fused model is computed tensor by tensor while it streams).
  Only for the largest size (it needs a second checkpoint on disk).

Peak memory per run: ``ru_maxrss`` of the child (the kernel's exact peak resident set, which
counts file-backed pages of memory-mapped checkpoints as well as anonymous memory), and the
peaks of RssAnon / RssFile sampled from /proc every 10 ms. Target: peak RSS below half the
model's size on disk for a model of at least 2 GB; the curve over 3+ sizes shows whether
memory grows with the model. Benchmarks print; tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

# decoder shape of every size (only the number of layers changes)
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


# --------------------------------------------------------------------------- random models


def word(index: int) -> str:
    return f"w{index}"


def write_tokenizer(path: str, vocab: int) -> None:
    """A word-level tokenizer over ``vocab`` tokens (4 specials + words ``w0`` …)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {token: i for i, token in enumerate(SPECIAL)}
    for i in range(vocab - len(SPECIAL)):
        table[word(i)] = len(SPECIAL) + i
    tokenizer = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)


def write_random_llama(
    path: str,
    layers: int,
    hidden: int = HIDDEN,
    intermediate: int = INTERMEDIATE,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
    vocab: int = VOCAB,
    dtype: str = "float32",
    seed: int = 0,
    shard_bytes: int = 1 << 30,
    perturb_of: str = "",
) -> str:
    """Write a random Llama checkpoint (sharded safetensors + index, config, tokenizer).

    Tensors are generated one at a time, so building never holds more than one shard. With
    ``perturb_of`` the weights are that checkpoint's plus small seeded noise (an "expert").
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if os.path.exists(os.path.join(path, "done")):
        return path
    os.makedirs(path, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    head_dim = hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]

    source = None
    if perturb_of:
        index_path = os.path.join(perturb_of, "model.safetensors.index.json")
        with open(index_path) as handle:
            source_map = json.load(handle)["weight_map"]
        source = {f: safe_open(os.path.join(perturb_of, f), framework="pt") for f in set(source_map.values())}
    generator = torch.Generator().manual_seed(seed)
    element = torch.empty((), dtype=torch_dtype).element_size()
    shards, current, size = [], {}, 0
    weight_map = {}

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, os.path.join(path, name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    for name, shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        if size and size + numel * element > shard_bytes:
            flush()
        if source is not None:
            base = source[source_map[name]].get_tensor(name).float()
            tensor = base + torch.randn(shape, generator=generator) * 0.002
        elif len(shape) == 1:
            tensor = torch.ones(shape)
        else:
            tensor = torch.randn(shape, generator=generator) * 0.02
        current[name] = tensor.to(torch_dtype)
        size += numel * element
    flush()
    count = len(shards)
    for i, (file, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        os.replace(os.path.join(path, file), os.path.join(path, final))
        weight_map.update({n: final for n in names})
    total = sum(os.path.getsize(os.path.join(path, f)) for f in set(weight_map.values()))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=1)
    LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype=dtype,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)
    write_tokenizer(path, vocab)
    with open(os.path.join(path, "done"), "w") as handle:
        handle.write("ok\n")
    return path


def build_in_child(**kwargs) -> str:
    """:func:`write_random_llama` in a child process, so the driver never holds a model: on
    Linux a fork()ed child starts with the parent's resident pages, which would inflate the
    ``ru_maxrss`` of every later measured child."""
    path = kwargs["path"]
    if os.path.exists(os.path.join(path, "done")):
        return path
    subprocess.run([sys.executable, os.path.abspath(__file__), "--build", json.dumps(kwargs)], check=True)
    return path


def checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def write_calibration_data(folder: str, samples: int, length: int, vocab: int = VOCAB, seed: int = 0) -> dict:
    """JSONL calibration sets of random words: prompt ≈ length/2 words, response the rest."""
    import random

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    for kind in ("safety", "utility", "harmful"):
        path = os.path.join(folder, f"{kind}-{samples}x{length}.jsonl")
        paths[kind] = path
        if os.path.exists(path):
            continue
        with open(path, "w") as handle:
            for _ in range(samples):
                n = rng.randint(length // 2, length - 1)
                words = [word(rng.randrange(vocab - len(SPECIAL))) for _ in range(n)]
                cut = n // 2
                handle.write(json.dumps({"prompt": " ".join(words[:cut]), "response": " ".join(words[cut:])}) + "\n")
    return paths


# --------------------------------------------------------------------------- memory probe


class MemoryProbe:
    """Peak RssAnon / RssFile / VmRSS of this process, sampled from /proc every ``interval``."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self.start = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    key = line.split(":", 1)[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]))
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self.sample()
        self.start = dict(self.peak)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    def report(self) -> dict:
        import resource

        return {
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_anon_mb": self.peak["RssAnon"] / 1024,
            "peak_file_mb": self.peak["RssFile"] / 1024,
            "peak_vmrss_sampled_mb": self.peak["VmRSS"] / 1024,
            "start_anon_mb": self.start["RssAnon"] / 1024,
            "start_file_mb": self.start["RssFile"] / 1024,
        }


def baseline_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# --------------------------------------------------------------------------- runs


def locate_config(kind: str, model: str, expert: str, data: dict, samples: int, length: int, artifact: str) -> str:
    if kind == "ssah":
        return (
            f"merge_method: ssah\nbase_model: {model}\ndtype: float32\nmodels:\n  - model: {model}\n"
            f"parameters:\n  mask: {artifact}\n  safety_data: {data['safety']}\n  utility_data: {data['utility']}\n"
            f"  max_samples: {samples}\n  max_length: {length}\n"
        )
    return (
        f"merge_method: antidote\nbase_model: {model}\ndtype: float32\nmodels:\n"
        f"  - model: {expert}\n    parameters:\n      weight: 0.5\n"
        f"parameters:\n  mask: {artifact}\n  harmful_data: {data['harmful']}\n  alpha: 0.05\n"
        f"  max_samples: {samples}\n  max_length: {length}\n"
    )


def run_one(kind: str, spec_path: str) -> dict:
    """Executed in a fresh subprocess: imports first, then the measured work."""
    import logging

    with open(spec_path) as handle:
        spec = json.load(handle)
    logging.disable(logging.WARNING)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    if kind == "engine":
        from mergekit_safety.engine.calibration import collect_statistics, load_examples

        examples = load_examples(spec["data"]["harmful"], spec["samples"])
        before = baseline_rss_mb()
        with MemoryProbe() as probe:
            start = time.perf_counter()
            stats = collect_statistics(
                spec["model"], examples, modules="*", token_scope="all", batch_size=spec["batch_size"],
                max_length=spec["length"], streaming=True, progress=False,
            )
            elapsed = time.perf_counter() - start
        tokens = next(iter(stats.values())).count
    else:
        import mergekit.merge_methods  # noqa: F401  registration
        from mergekit_safety.plugin.config import locate_config as locate

        if os.path.exists(spec["artifact"]):
            os.remove(spec["artifact"])
        before = baseline_rss_mb()
        with MemoryProbe() as probe:
            start = time.perf_counter()
            locate(spec["config"], force=True)
            elapsed = time.perf_counter() - start
        tokens = None
    return {"seconds": elapsed, "tokens": tokens, "rss_before_mb": before, **probe.report()}


def measure(kind: str, spec: dict, workdir: str) -> dict:
    spec_path = os.path.join(workdir, f"spec-{kind}.json")
    with open(spec_path, "w") as handle:
        json.dump(spec, handle)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--run-one", kind, spec_path],
        capture_output=True, text=True, check=False, env=env,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,4,10,14", help="decoder layers of each model (comma-separated)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", default="engine,ssah,antidote")
    parser.add_argument("--workdir", default=os.path.join("benchmarks", ".work", "streaming"))
    parser.add_argument("--json", default=os.path.join("benchmarks", "results", "streaming.json"))
    parser.add_argument("--run-one", nargs=2, metavar=("KIND", "SPEC"))
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(*args.run_one)))
        return
    if args.build:
        write_random_llama(**json.loads(args.build))
        return

    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    data = write_calibration_data(os.path.join(workdir, "data"), args.samples, args.length)
    results = []
    for layers in sizes:
        model = build_in_child(path=os.path.join(workdir, f"llama-{layers}L-{args.dtype}"), layers=layers, dtype=args.dtype)
        size_mb = checkpoint_bytes(model) / 2**20
        expert = ""
        for kind in runs:
            if kind == "antidote":
                if layers != max(sizes):
                    continue
                expert = build_in_child(
                    path=os.path.join(workdir, f"llama-{layers}L-{args.dtype}-expert"), layers=layers, dtype=args.dtype,
                    seed=1, perturb_of=model,
                )
            spec = {"model": model, "data": data, "samples": args.samples, "length": args.length, "batch_size": args.batch_size}
            if kind in ("ssah", "antidote"):
                artifact = os.path.join(workdir, f"{kind}-{layers}L.safetensors")
                config = os.path.join(workdir, f"{kind}-{layers}L.yml")
                with open(config, "w") as handle:
                    handle.write(locate_config(kind, model, expert, data, args.samples, args.length, artifact))
                spec.update(config=config, artifact=artifact)
            row = {"layers": layers, "model_mb": size_mb, "run": kind, **measure(kind, spec, workdir)}
            row["rss_over_model"] = row["peak_rss_mb"] / size_mb
            results.append(row)
            print(
                f"  {kind:<9} {layers:>3} layers {size_mb:8.0f} MB: {row['seconds']:7.1f} s, peak RSS "
                f"{row['peak_rss_mb']:6.0f} MB (anon {row['peak_anon_mb']:.0f}, file {row['peak_file_mb']:.0f}) "
                f"= {row['rss_over_model']:.2f}× model",
                flush=True,
            )

    print(f"\nrandom Llamas (hidden {HIDDEN}, intermediate {INTERMEDIATE}, vocab {VOCAB}), {args.dtype} on disk, "
          f"{args.samples} samples × ≤{args.length} tokens, {os.cpu_count()} CPU cores")
    print(f"{'run':<9} {'layers':>6} {'model MB':>9} {'peak RSS MB':>12} {'anon MB':>8} {'file MB':>8} {'RSS/model':>10} {'target':>7} {'s':>7}")
    for row in results:
        target = "< 0.50" if row["model_mb"] >= 2048 else ""
        print(
            f"{row['run']:<9} {row['layers']:>6} {row['model_mb']:>9.0f} {row['peak_rss_mb']:>12.0f} "
            f"{row['peak_anon_mb']:>8.0f} {row['peak_file_mb']:>8.0f} {row['rss_over_model']:>10.2f} {target:>7} {row['seconds']:>7.1f}"
        )
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(
            {"dtype": args.dtype, "samples": args.samples, "length": args.length, "batch_size": args.batch_size,
             "cpu_count": os.cpu_count(), "results": results},
            handle, indent=2,
        )
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
