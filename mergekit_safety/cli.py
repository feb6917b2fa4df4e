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


# --- lab commands (mergekit_safety/lab) ---
# --- end lab commands ---


if __name__ == "__main__":  # pragma: no cover
    main()
