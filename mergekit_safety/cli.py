"""The `mergekit-safety` command line. Thin: parse, call a library function, print."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="mergekit-safety")
def main() -> None:
    """Safety-restoring merge methods for mergekit, and the safety lab that measures them."""


@main.command("methods")
def methods_command() -> None:
    """List this package's merge methods, their parameters and papers."""
    from mergekit_safety.registration import describe_methods

    click.echo(describe_methods())


@main.command("check")
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
def check_command(configs) -> None:
    """Validate merge CONFIGS before any tensor is loaded (one line per problem)."""
    from mergekit_safety.checks import check_config_file

    failed = False
    for config in configs:
        problems = check_config_file(config)
        for problem in problems:
            click.echo(problem.format(config), err=True)
        if problems:
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
    from mergekit_safety.artifacts import ArtifactError
    from mergekit_safety.locate import locate_config

    try:
        path = locate_config(config, force=force)
    except ArtifactError as error:
        raise click.ClickException(str(error)) from None
    click.echo(path)


@main.command("inspect")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--png", default=None, help="Heat map PNG path (default: ARTIFACT with .png).")
@click.option("--no-png", is_flag=True, help="Print the report only.")
@click.option("--protect-share", type=click.FloatRange(0, 1), default=0.075, show_default=True)
@click.option("--control", type=click.Choice(["none", "random"]), default="none", show_default=True)
@click.option("--control-seed", type=int, default=0, show_default=True)
@click.option("--kv-policy", type=click.Choice(["any", "all", "none"]), default="any", show_default=True)
def inspect_command(artifact, png, no_png, protect_share, control, control_seed, kv_policy) -> None:
    """Label shares per layer of an SSAH unit ARTIFACT, and a heat map of where safety lives."""
    import os

    from mergekit_safety.artifacts import ArtifactError
    from mergekit_safety.methods.ssah import ProtectSettings, inspect_artifact

    if png is None and not no_png:
        png = os.path.splitext(artifact)[0] + ".png"
    settings = ProtectSettings(
        protect_share=protect_share, control=control, control_seed=control_seed, kv_policy=kv_policy
    )
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


if __name__ == "__main__":  # pragma: no cover
    main()
