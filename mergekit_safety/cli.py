"""The `mergekit-safety` command line. Thin: parse, call a library function, print."""

from __future__ import annotations

from typing import Any, List

import click


def settings_options(settings_class: Any, names: List[str]):
    """Click options for the named parameters of a method's settings (type, range, default
    and help come from the settings: their single declaration)."""
    from typing import Literal, get_args, get_origin

    from typing_extensions import Annotated

    def click_type(value_type):
        origin = get_origin(value_type)
        if origin is Annotated:
            inner, *constraints = get_args(value_type)
            bounds = {}
            for constraint in constraints:
                for key in ("ge", "le"):
                    if hasattr(constraint, key):
                        bounds["min" if key == "ge" else "max"] = getattr(constraint, key)
            if inner is float:
                return click.FloatRange(bounds.get("min"), bounds.get("max"))
            if inner is int:
                return click.IntRange(bounds.get("min"), bounds.get("max"))
            return click_type(inner)
        if origin is Literal:
            return click.Choice([str(v) for v in get_args(value_type)])
        return value_type

    def decorate(function):
        for parameter in reversed([settings_class.parameter(n) for n in names]):
            option = "--" + parameter.name.replace("_", "-")
            function = click.option(option, parameter.field, type=click_type(parameter.value_type),
                                    default=parameter.default, show_default=True,
                                    help=parameter.description)(function)
        return function

    return decorate



from mergekit_safety.methods.ssah.config import ProtectSettings  # noqa: E402  (pydantic only)


@click.group()
@click.version_option(package_name="mergekit-safety")
def main() -> None:
    """Safety-restoring merge methods for mergekit, and the safety lab that measures them."""


@main.command("methods")
def methods_command() -> None:
    """List this package's merge methods, their parameters and papers."""
    from mergekit_safety.plugin.registration import describe_methods

    click.echo(describe_methods())


@main.command("check")
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
def check_command(configs) -> None:
    """Validate merge CONFIGS before any tensor is loaded (one line per problem)."""
    from mergekit_safety.plugin.checks import check_config_file

    failed = False
    for config in configs:
        problems = check_config_file(config)
        for problem in problems:
            click.echo(problem.format(config), err=True)
        if any(not p.warning for p in problems):
            failed = True
        else:
            click.echo(f"{config}: ok")
    if failed:
        raise SystemExit(1)


@main.command("locate")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--force", is_flag=True, help="Recompute even if a current artifact exists.")
def locate_command(config: str, force: bool) -> None:
    """Compute the artifact (masks/scores) a merge CONFIG needs, where it says."""
    from mergekit_safety.fusion.artifacts import ArtifactError
    from mergekit_safety.plugin.config import locate_config

    try:
        path = locate_config(config, force=force)
    except ArtifactError as error:
        raise click.ClickException(str(error)) from None
    click.echo(path)


@main.command("pairs")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for pairs.jsonl / utility.jsonl (default: the cache folder a merge would use).")
@click.option("--harmful-prompts", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSONL of harmful prompts (default: the config's harmful_prompts).")
@click.option("--benign-prompts", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSONL of benign prompts for utility data (default: the config's benign_prompts).")
def pairs_command(config, out, harmful_prompts, benign_prompts) -> None:
    """Build SOMF preference pairs (and utility data) for CONFIG's models: the aligned base
    model's refusals vs the unmasked fusion's compliant answers, as judged."""
    import dataclasses

    from mergekit_safety.fusion.artifacts import ArtifactError
    from mergekit_safety.fusion.models import resolve_model
    from mergekit_safety.methods.somf.method import SOMF
    from mergekit_safety.methods.somf.pairs import PairsError
    from mergekit_safety.plugin.config import request_from_config

    try:
        method, request = request_from_config(config)
        if not isinstance(method, SOMF):
            raise click.ClickException(f"{config}: pairs are built for merge_method: somf, not {method.name}")
        parameters = dict(request.parameters)
        parameters["harmful_prompts"] = harmful_prompts or parameters.get("harmful_prompts")
        parameters["benign_prompts"] = benign_prompts or parameters.get("benign_prompts")
        parameters["preference_data"] = "auto"
        parameters["utility_data"] = "auto" if parameters["benign_prompts"] else parameters.get("utility_data")
        request = dataclasses.replace(request, parameters=parameters)
        _, report = method.auto_data(request, resolve_model(request.base), [resolve_model(e) for e in request.experts], out_dir=out)
    except (ArtifactError, PairsError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(
        f"{report['pairs']} pairs from {report['prompts']} prompts (aligned refused {report['aligned_refusals']}, "
        f"fusion complied with {report['fusion_compliances']})"
        + (f"; {report['utility_records']} utility records" if "utility_records" in report else "")
        + f" in {report['folder']}"
    )


@main.command("sweep")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--vary", "vary", multiple=True, required=True,
              help="NAME=v1,v2,… — a parameter of the config's method (or weight/density for every model); repeat for a grid.")
@click.option("--out", default="out/sweep", show_default=True, type=click.Path(file_okay=False),
              help="Folder for results.json/.csv/.md, frontier.png and the resumable results.jsonl.")
@click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False),
              help="Evaluation data folder (eval_benign.jsonl, eval_harmful.jsonl; default ./lab/data).")
@click.option("--benign", default=None, type=click.Path(dir_okay=False), help="Benign prompts JSONL (overrides --data).")
@click.option("--harmful", default=None, type=click.Path(dir_okay=False), help="Harmful prompts JSONL (overrides --data).")
@click.option("--limit", default=None, type=int, help="Evaluate only the first N prompts of each set.")
@click.option("--max-points", default=32, show_default=True, type=int, help="Largest grid run without --yes.")
@click.option("--yes", is_flag=True, help="Run a grid larger than --max-points.")
@click.option("--keep", is_flag=True, help="Keep the merged models (default: deleted after their evaluation).")
def sweep_command(config, vary, out, data_dir, benign, harmful, limit, max_points, yes, keep) -> None:
    """Merge and evaluate CONFIG over a grid of parameter values: the safety–utility frontier."""
    import os

    import shlex

    from mergekit_safety.sweep import SweepError, run_sweep

    if data_dir is None and (benign is None or harmful is None):
        data_dir = os.path.join("lab", "data")
    command = shlex.join(["mergekit-safety", "sweep", config, *[a for v in vary for a in ("--vary", v)], "--out", out]
                         + [a for flag, value in (("--data", data_dir), ("--benign", benign), ("--harmful", harmful),
                                                  ("--limit", limit)) if value is not None for a in (flag, str(value))])
    try:
        result = run_sweep(config, vary, out, eval_kwargs=dict(data_dir=data_dir, benign=benign, harmful=harmful, limit=limit),
                           max_points=max_points, yes=yes, keep=keep, log=lambda m: click.echo(m, err=True),
                           command=command)
    except SweepError as error:
        raise click.ClickException(str(error)) from None
    click.echo(open(result["files"]["markdown"], encoding="utf-8").read())
    click.echo("wrote " + ", ".join(result["files"].values()))


@main.command("frontier")
@click.argument("sweeps", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="out/frontier.png", show_default=True, type=click.Path(dir_okay=False),
              help="The combined figure (PNG); a Markdown table with every point and each sweep's command goes beside it.")
def frontier_command(sweeps, out) -> None:
    """One safety–utility figure of several finished SWEEPS folders (one line per sweep, its
    random-control points as crosses)."""
    import os

    from mergekit_safety.sweep import SweepError, combine_frontiers

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
        result = combine_frontiers(sweeps, out, os.path.splitext(out)[0] + ".md")
    except SweepError as error:
        raise click.ClickException(str(error)) from None
    click.echo("wrote " + ", ".join(result["files"].values()))


@main.command("inspect")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--png", default=None, help="Heat map PNG path (default: ARTIFACT with .png).")
@click.option("--no-png", is_flag=True, help="Print the report only.")
@settings_options(ProtectSettings, ["protect_share", "control", "control_seed", "kv_policy"])
def inspect_command(artifact, png, no_png, **protect) -> None:
    """Label shares per layer of an SSAH unit ARTIFACT, and a heat map of where safety lives.

    ARTIFACT is the artifact file, or the merge config (.yml) whose artifact to show — with
    `mask: auto` that file lives in the cache folder (MERGEKIT_SAFETY_CACHE)."""
    import os

    from mergekit_safety.fusion.artifacts import ArtifactError
    from mergekit_safety.methods.ssah.inspect import inspect_artifact

    if artifact.endswith((".yml", ".yaml")):
        from mergekit_safety.plugin.config import request_from_config

        try:
            method, request = request_from_config(artifact)
        except ArtifactError as error:
            raise click.ClickException(str(error)) from None
        config, artifact = artifact, method.artifact_path(method.resolved(request))
        if not os.path.exists(artifact):
            raise click.ClickException(f"{config}: its artifact {artifact} does not exist yet; "
                                       f"compute it with `mergekit-safety locate {config}`")
        click.echo(f"{config}: artifact {artifact}")
    if png is None and not no_png:
        png = os.path.splitext(artifact)[0] + ".png"
    settings = ProtectSettings(**protect)
    try:
        click.echo(inspect_artifact(artifact, None if no_png else png, settings))
    except ArtifactError as error:
        raise click.ClickException(str(error)) from None


# --- lab commands (mergekit_safety/lab) ---
from mergekit_safety.lab.commands import demo_command, eval_command, lab_command  # noqa: E402

main.add_command(lab_command)
main.add_command(eval_command)
main.add_command(demo_command)
# --- end lab commands ---

from mergekit_safety.cli_data import data_command  # noqa: E402

main.add_command(data_command)


if __name__ == "__main__":  # pragma: no cover
    main()
