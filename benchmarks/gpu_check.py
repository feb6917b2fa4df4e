"""GPU check (issue 16): this package's methods on mergekit's CUDA executors and on one
accelerator, as ratios and differences measured in one run.

    bash scripts/gpu_check.sh                          # DEVICE=cuda SIZE=small, about 5 minutes
    DEVICE=cpu SIZE=tiny bash scripts/gpu_check.sh     # dry run on a CPU machine: checks the script

Random bf16 Llamas (base, 3 experts, an "unaligned" model), then:

1. **merges** — mergekit `task_arithmetic`, `masked_fusion` + mask, `somf` / `ssah` /
   `antidote` + artifact, `resta`, `safe_lora`, `safemerge`, each on the CPU executor and with
   ``MergeOptions(cuda=True)`` (and ``multi_gpu=True`` where more than one GPU exists): wall-time
   ratio and the largest |difference| of any output tensor relative to that tensor's largest |w|.
2. **calibration** (Antidote's and SSAH's statistics pass, streaming): on the device vs the CPU,
   time ratio and largest relative difference of ‖X_j‖².
3. **SOMF** — one mask-learning step (Concrete masks, fusion, forward, DPO, backward, AdamW) on
   the device vs a plain forward + backward of the same model on the device (target ≤ 1.3),
   and the SOMF step on the device vs on the CPU.

With ``--device cpu`` every "device" run is a CPU run: the ratios then say nothing about an
accelerator, only that the script works. Nothing here is a test; tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_calibration import random_examples  # noqa: E402
from bench_merge import build_models, config_text, write_keep_mask, write_method_artifacts  # noqa: E402


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def merge_once(config_path: str, out: str, cuda: bool, multi_gpu: bool = False) -> tuple:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    with open(config_path) as handle:
        config = MergeConfiguration.model_validate(yaml.safe_load(handle))
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0,
                           cuda=cuda, multi_gpu=multi_gpu)
    start = time.perf_counter()
    run_merge(config, out, options=options)
    return time.perf_counter() - start, out


def largest_difference(a_dir: str, b_dir: str) -> float:
    """max over tensors of max|a − b| / max|a| (0 for identical outputs)."""
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(folder, name), framework="pt") as handle:
                    out.update({k: handle.get_tensor(k).float() for k in handle.keys()})
        return out

    a, b = tensors(a_dir), tensors(b_dir)
    if set(a) != set(b):
        raise RuntimeError(f"{a_dir} and {b_dir} hold different tensors")
    worst = 0.0
    for name in a:
        scale = float(a[name].abs().max()) or 1.0
        worst = max(worst, float((a[name] - b[name]).abs().max()) / scale)
    return worst


def check_merges(paths: dict, workdir: str, device: str, gpus: int) -> list:
    cuda = device.startswith("cuda")
    mask = os.path.join(workdir, "keep.safetensors")
    write_keep_mask(mask, paths, 3)
    unaligned = f"  unaligned_model: {paths['expert3']}\n"
    configs = {
        "mergekit task_arithmetic": config_text("task_arithmetic", paths, 3),
        "masked_fusion + mask": config_text("masked_fusion", paths, 3, f"  mask: {mask}\n"),
        "resta": config_text("resta", paths, 3, unaligned + "  gamma: 0.5\n"),
        "safe_lora": config_text("safe_lora", paths, 3, unaligned + "  threshold: 0.5\n"),
        "safemerge": config_text("safemerge", paths, 3, unaligned + "  threshold: 0.5\n"),
    }
    for method, path in write_method_artifacts(workdir, paths, 3, "gpu").items():
        with open(path) as handle:
            configs[f"{method} + artifact"] = handle.read()
    rows = []
    for label, text in configs.items():
        config_path = os.path.join(workdir, label.replace(" ", "_").replace("+", "plus") + ".yml")
        with open(config_path, "w") as handle:
            handle.write(text)
        if label in ("safe_lora", "safemerge"):  # their cosine artifact computed ahead: the merges alone are timed
            from mergekit_safety.plugin.config import locate_config

            locate_config(config_path)
        cpu_s, cpu_out = merge_once(config_path, os.path.join(workdir, "out-cpu", label.replace(" ", "_")), cuda=False)
        dev_s, dev_out = merge_once(config_path, os.path.join(workdir, "out-dev", label.replace(" ", "_")), cuda=cuda)
        row = {"merge": label, "cpu_seconds": cpu_s, "device_seconds": dev_s, "time_ratio": dev_s / cpu_s,
               "max_relative_difference": largest_difference(cpu_out, dev_out)}
        if cuda and gpus > 1:
            multi_s, multi_out = merge_once(config_path, os.path.join(workdir, "out-multi", label.replace(" ", "_")),
                                            cuda=True, multi_gpu=True)
            row.update(multi_gpu_seconds=multi_s, multi_gpu_difference=largest_difference(cpu_out, multi_out))
        rows.append(row)
        print(f"  merge {label}: CPU {cpu_s:.1f} s, {device} {dev_s:.1f} s (× {dev_s / cpu_s:.2f}), "
              f"max rel. difference {row['max_relative_difference']:.2e}", flush=True)
    return rows


def check_calibration(model: str, vocab: int, device: str, samples: int, length: int) -> dict:
    from mergekit_safety.engine.calibration import collect_statistics

    examples = random_examples(samples, length, vocab)
    timings, stats = {}, {}
    for where in ("cpu", device):
        _sync(device)
        start = time.perf_counter()
        stats[where] = collect_statistics(model, examples, modules="*", token_scope="all", batch_size=8,
                                          progress=False, device=where)
        _sync(device)
        timings[where] = time.perf_counter() - start
    worst = max(float(((stats[device][n].sum_sq - stats["cpu"][n].sum_sq).abs() / stats["cpu"][n].sum_sq.clamp(min=1e-12)).max())
                for n in stats["cpu"])
    row = {"cpu_seconds": timings["cpu"], "device_seconds": timings[device],
           "time_ratio": timings[device] / timings["cpu"], "max_relative_difference": worst}
    print(f"  calibration: CPU {timings['cpu']:.1f} s, {device} {timings[device]:.1f} s "
          f"(× {row['time_ratio']:.2f}), max rel. difference of ‖X‖² {worst:.2e}", flush=True)
    return row


def somf_step_seconds(paths: dict, device: str, pairs: int, length: int, vocab: int, steps: int) -> float:
    import torch

    from mergekit_safety.engine.data import collate
    from mergekit_safety.methods.somf.method import SOMFSettings
    from mergekit_safety.methods.somf.training import FunctionalFusion, dpo_loss

    experts = [paths[f"expert{i}"] for i in range(3)]
    settings = SOMFSettings(preference_data="(gpu check)", weights=(1 / 3,) * 3, densities=(1.0,) * 3,
                            batch_size=pairs, device=device, dtype="bfloat16" if device != "cpu" else "float32")
    batch = collate(random_examples(2 * pairs, length, vocab, seed=1), 0)
    ids, att, resp = batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["response_mask"].to(device)
    fusion = FunctionalFusion(paths["base"], experts, settings, progress=False)
    with torch.no_grad():
        reference = fusion.response_logps(None, ids, att, resp)
    parameters = list(fusion.logits.values())
    optimizer = torch.optim.AdamW(parameters, lr=0.1, weight_decay=0.0)
    generator = (torch.Generator().manual_seed(0) if device == "cpu"
                 else torch.Generator(device=device).manual_seed(0))
    times = []
    for step in range(steps + 1):  # step 0 warms up
        _sync(device)
        start = time.perf_counter()
        params = fusion.parameters_for(fusion.sample_masks(generator), exact=False)
        logps = fusion.response_logps(params, ids, att, resp)
        loss, _ = dpo_loss(logps[:pairs], logps[pairs:], reference[:pairs], reference[pairs:], settings.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        _sync(device)
        if step:
            times.append(time.perf_counter() - start)
    return min(times)


def plain_step_seconds(model_dir: str, device: str, pairs: int, length: int, vocab: int, steps: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from mergekit_safety.engine.data import collate
    from mergekit_safety.methods.somf.training import response_positions, sequence_logps

    batch = collate(random_examples(2 * pairs, length, vocab, seed=1), 0)
    ids, att, resp = batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["response_mask"].to(device)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).train()
    positions = response_positions(resp)
    times = []
    for step in range(steps + 1):
        _sync(device)
        start = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=att, logits_to_keep=positions).logits
        logps = sequence_logps(logits, ids, resp, positions)
        loss = -torch.nn.functional.logsigmoid(0.1 * (logps[:pairs] - logps[pairs:])).mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        if step:
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="small", choices=("tiny", "small", "medium"))
    parser.add_argument("--workdir", default=None, help="models and merges (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/gpu_check-<device type>.json")
    parser.add_argument("--steps", type=int, default=3, help="timed SOMF / plain steps (after one warm-up)")
    parser.add_argument("--samples", type=int, default=32, help="calibration examples")
    args = parser.parse_args()

    import torch

    from mergekit_safety.engine.calibration import resolve_device

    resolve_device(args.device)  # a clear error on a machine without the device
    args.json = args.json or os.path.join("benchmarks", "results", f"gpu_check-{args.device.split(':')[0]}.json")
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu-check-")
    os.makedirs(workdir, exist_ok=True)
    os.environ.setdefault("MERGEKIT_SAFETY_CACHE", os.path.join(workdir, "cache"))  # artifacts stay in the workdir
    started = time.time()
    print(f"gpu check: device {args.device} ({torch.cuda.get_device_name(0) if gpus else 'no GPU'}), "
          f"size {args.size}, torch {torch.__version__}, work {workdir}", flush=True)
    paths = build_models(workdir, args.size, 4)  # expert3 serves as the unaligned model
    from bench_merge import SIZES

    vocab = SIZES[args.size][5]
    report = {"device": args.device, "gpus": gpus, "size": args.size, "torch": torch.__version__,
              "gpu_name": torch.cuda.get_device_name(0) if gpus else None}
    report["merges"] = check_merges(paths, workdir, args.device, gpus)
    report["calibration"] = check_calibration(paths["base"], vocab, args.device, args.samples, 128)
    pairs, length = 8, 128
    somf_device = somf_step_seconds(paths, args.device, pairs, length, vocab, args.steps)
    plain_device = plain_step_seconds(paths["base"], args.device, pairs, length, vocab, args.steps)
    somf_cpu = somf_step_seconds(paths, "cpu", pairs, length, vocab, 1) if args.device != "cpu" else somf_device
    report["somf"] = {"step_seconds": somf_device, "plain_step_seconds": plain_device,
                      "step_vs_plain": somf_device / plain_device, "target": 1.3,
                      "cpu_step_seconds": somf_cpu, "device_vs_cpu": somf_device / somf_cpu}
    print(f"  SOMF step on {args.device}: {somf_device:.3f} s; plain forward+backward {plain_device:.3f} s "
          f"(× {somf_device / plain_device:.2f}, target ≤ 1.3); vs CPU step {somf_cpu:.3f} s "
          f"(× {somf_device / somf_cpu:.2f})", flush=True)
    report["seconds"] = time.time() - started
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"written {args.json} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
