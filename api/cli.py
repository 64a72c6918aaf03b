"""The `flashdmd` command. Sub-commands import their heavy modules lazily."""

from __future__ import annotations

import click

from trainer.cli import train_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashdmd")
def cli() -> None:
    """Flash-DMD: distil, tune, evaluate, export and serve few-step diffusion generators."""


cli.add_command(train_command)


def main() -> None:
    cli(prog_name="flashdmd")
