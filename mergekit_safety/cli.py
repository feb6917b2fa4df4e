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


# --- lab commands (mergekit_safety/lab) ---
# --- end lab commands ---


if __name__ == "__main__":  # pragma: no cover
    main()
