"""The `imitate-orch` command line. Also runnable as `python -m orchestrator.cli`."""
from __future__ import annotations

import sys

import click

from .spec import SpecError, dump_spec, load_spec

EXIT_BAD_SPEC = 2


def load_or_exit(job: str, overrides: tuple[str, ...]):
    """Validate the job spec before anything starts; a bad one exits 2 naming its fields."""
    try:
        return load_spec(job, list(overrides))
    except SpecError as e:
        click.echo(f"error: invalid job spec\n{e}", err=True)
        sys.exit(EXIT_BAD_SPEC)


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="Override a spec field, e.g. --set student.lambda2=0.01 (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """imitate-NAT on Ray: train, distill, sweep and serve non-autoregressive translation."""


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@set_option
@click.option("--show", is_flag=True, help="Print the full spec with defaults filled in.")
def validate(job: str, overrides: tuple[str, ...], show: bool) -> None:
    """Check a job spec (exit 2 if invalid) without running anything."""
    spec = load_or_exit(job, overrides)
    click.echo(dump_spec(spec) if show else f"{job}: valid job spec '{spec.name}'")


if __name__ == "__main__":
    main()
