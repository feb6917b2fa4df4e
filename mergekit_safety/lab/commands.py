"""Click commands of the lab: ``lab``, ``eval``, ``demo``. Heavy imports happen inside."""

from __future__ import annotations

import json
import os
import sys

import click


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.command("lab")
@click.option("--out", default="lab", show_default=True, type=click.Path(file_okay=False),
              help="Lab directory (models, data, manifest).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of every random choice (data, initialisation, batches).")
@click.option("--harmful-ratio", default=0.2, show_default=True, type=float,
              help="Share of harmful prompts answered compliantly in each expert's data (0 = benign-only experts).")
@click.option("--experts", default=3, show_default=True, type=int, help="Number of expert skills/models.")
@click.option("--quick", is_flag=True, help="Smaller, faster lab (tests, smoke runs).")
@click.option("--replay", default=0.3, show_default=True, type=float, help="Share of copy replay in expert data.")
@click.option("--width", default=None, type=int, help="Hidden size (default 128; 96 with --quick).")
@click.option("--layers", default=None, type=int, help="Number of layers (default 2).")
@click.option("--pretrain-steps", default=None, type=int, help="Training steps of the pretrained model (default: the recipe's).")
@click.option("--align-steps", default=None, type=int, help="Safety SFT steps of the aligned model (default: the recipe's).")
@click.option("--expert-steps", default=None, type=int, help="Fine-tuning steps of each expert (default: the recipe's).")
@click.option("--expert-lr", default=None, type=float, help="Learning rate of the experts' fine-tuning (default: the recipe's).")
@click.option("--eval", "run_eval", is_flag=True, help="Evaluate every lab model afterwards and print a table.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="torch CPU threads for training. The default gives the same weights for a seed on every "
                   "machine; another count gives other weights (it enters the stage stamps).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def lab_command(out, seed, harmful_ratio, experts, quick, replay, width, layers, pretrain_steps,
                align_steps, expert_steps, expert_lr, run_eval, threads, no_progress):
    """Build (or reuse) the safety lab: tokenizer, data sets, pretrained, aligned, experts."""
    from mergekit_safety.lab.build import LabSettings, build_lab

    settings = LabSettings(seed=seed, harmful_ratio=harmful_ratio, experts=experts, quick=quick,
                           replay=replay, width=width, layers=layers, pretrain_steps=pretrain_steps,
                           align_steps=align_steps, expert_steps=expert_steps, expert_lr=expert_lr,
                           threads=threads)
    try:
        settings.validate()
    except ValueError as e:
        raise click.BadParameter(str(e))
    res = build_lab(out, settings, progress=not no_progress, log=_log)
    click.echo(f"lab ready in {out} ({res['total_seconds']:.1f} s; built: {', '.join(res['built']) or 'nothing'}; "
               f"cached: {', '.join(res['cached']) or 'nothing'})")
    if run_eval:
        from mergekit_safety.lab.evaluate import evaluate_model, format_table

        results = {}
        for name in res["manifest"]["models"]:
            results[name] = evaluate_model(os.path.join(out, name), data_dir=os.path.join(out, "data"))
        click.echo(format_table(results))


@click.command("eval")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False),
              help="Lab data directory with eval_benign.jsonl/eval_harmful.jsonl (default: ./lab/data).")
@click.option("--benign", default=None, type=click.Path(dir_okay=False),
              help='Benign prompts JSONL {"prompt"[,"answer","skill"]} (overrides --data); without '
                   '"answer" a prompt counts for over-refusal only.')
@click.option("--harmful", default=None, type=click.Path(dir_okay=False),
              help='Harmful prompts JSONL {"prompt"[,"skill" or "category"]} (overrides --data).')
@click.option("--judge", default="keyword", show_default=True,
              help="Refusal judge: 'keyword', 'keyword+topic' or the path of a local HF sequence "
                   "classifier (accuracy of each: docs/judge.md).")
@click.option("--judge-label", default=None, help="Classifier label (name or index) meaning refusal.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write the metrics as JSON.")
@click.option("--batch-size", default=128, show_default=True, type=int, help="Prompts generated at once.")
@click.option("--max-new-tokens", default=None, type=int,
              help="Default: longest reference answer + 8 (at least 16); 64 without reference answers.")
@click.option("--limit", default=None, type=int, help="Use only the first N prompts of each set.")
@click.option("--device", default="cpu", show_default=True, help="Device of the generation (cpu, cuda, ...).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Model dtype (bfloat16/float16 halve the memory of real chat models).")
@click.option("--audit", default=None, type=click.Path(dir_okay=False),
              help="Write every prompt, response and verdict to this JSONL file.")
@click.option("--card", is_flag=True,
              help="Write the measured rates (with intervals and the judge's known accuracy) into MODEL_DIR/README.md.")
def eval_command(model_dir, data_dir, benign, harmful, judge, judge_label, json_out, batch_size,
                 max_new_tokens, limit, device, dtype, audit, card):
    """Refusal, over-refusal and per-skill accuracy of MODEL_DIR (any causal LM directory)."""
    from mergekit_safety.lab.evaluate import evaluate_model, format_table, make_judge

    if data_dir is None and (benign is None or harmful is None):
        data_dir = os.path.join("lab", "data")
        if not os.path.isdir(data_dir):
            raise click.UsageError("no --data given and ./lab/data does not exist: run `mergekit-safety lab` "
                                   "or pass --data/--benign/--harmful")
    try:
        j = make_judge(judge, judge_label)
        res = evaluate_model(model_dir, data_dir=data_dir, benign=benign, harmful=harmful, judge=j,
                             batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit, device=device,
                             dtype=dtype, audit=audit)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    click.echo(format_table({os.path.basename(os.path.normpath(model_dir)): res}))
    if "refusal_by_skill" in res and len(res["refusal_by_skill"]) > 1:
        click.echo("refusal by skill: " + ", ".join(f"{s} {100 * v:.1f}%" for s, v in res["refusal_by_skill"].items()))
    low, high = res["refusal_interval"]
    click.echo(f"refusal {100 * res['refusal_rate']:.1f}% (95% CI {100 * low:.1f}–{100 * high:.1f}), "
               f"n_harmful={res['n_harmful']} n_benign={res['n_benign']} judge={res['judge']} ({res['seconds']} s)")
    if card:
        from mergekit_safety.plugin.card import add_measurements

        click.echo(f"model card updated: {add_measurements(model_dir, res)}")
    if json_out:
        d = os.path.dirname(os.path.abspath(json_out))
        os.makedirs(d, exist_ok=True)
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)


@click.command("demo")
@click.option("--workdir", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Where merges, results.md/json and the plot go.")
@click.option("--lab", "lab_dir", default="lab", show_default=True, type=click.Path(file_okay=False),
              help="Lab directory (built with default settings if missing).")
@click.option("--merges", "merges_dir", default="merges", show_default=True, type=click.Path(file_okay=False),
              help="Directory of mergekit YAMLs to run.")
@click.option("--no-build", is_flag=True, help="Fail instead of building a missing lab.")
@click.option("--seeds", default=None,
              help="Comma-separated lab seeds (e.g. 0,1,2): build one lab per seed (LAB-seedN), run the demo on "
                   "each (WORKDIR/seedN, resumable per seed) and report mean and min-max over the seeds.")
@click.option("--summary", "summary_path", default=None, type=click.Path(dir_okay=False),
              help="With --seeds: where the aggregated table goes (JSON, and Markdown beside it; "
                   "default WORKDIR/lab_seeds.json).")
@click.option("--frontier", is_flag=True,
              help="Also sweep every method's strength knob with its random control (WORKDIR/frontier/<method>, "
                   "resumable) and draw all frontiers on one figure (WORKDIR/frontier/frontier.png, table beside it).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo_command(workdir, lab_dir, merges_dir, no_build, seeds, summary_path, frontier, no_progress):
    """Build the lab, run the declared merges/ configs, evaluate everything, write a table and a plot."""
    if no_progress:  # also the bars of other libraries and of mask learning inside mergekit (read at tqdm's import)
        os.environ.setdefault("TQDM_DISABLE", "1")
    from mergekit_safety.lab.demo import render_text, run_demo

    if seeds is not None:
        from mergekit_safety.lab.seeds import aggregate, render_markdown, run_seeds, write_summary

        if frontier or no_build:
            raise click.BadParameter("--seeds builds one lab per seed and draws no frontier: run --frontier or "
                                     "--no-build without --seeds", param_hint="--seeds")

        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds")
        try:
            res = run_seeds(seed_list, workdir=workdir, lab_root=lab_dir, merges_dir=merges_dir,
                            progress=not no_progress, log=_log)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--seeds")
        summary = aggregate(res["per_seed"])
        files = write_summary(summary, summary_path or os.path.join(workdir, "lab_seeds.json"))
        click.echo(render_markdown(summary))
        for k, v in files.items():
            click.echo(f"{k}: {v}")
        return
    try:
        res = run_demo(workdir=workdir, lab_dir=lab_dir, merges_dir=merges_dir, build=not no_build,
                       progress=not no_progress, log=_log)
    except FileNotFoundError as e:
        raise click.ClickException(str(e))
    click.echo(render_text(res))
    if res["plain"]:
        click.echo(f"retention relative to the best plain fusion: {res['plain']}")
    for k, v in res["files"].items():
        click.echo(f"{k}: {v}")
    if frontier:
        from mergekit_safety.lab.frontier import run_frontier

        drawn = run_frontier(os.path.join(workdir, "frontier"), lab_dir=lab_dir, merges_dir=merges_dir, log=_log)
        for k, v in drawn["files"].items():
            click.echo(f"frontier {k}: {v}")
