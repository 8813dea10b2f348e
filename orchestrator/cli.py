"""The `imitate-orch` command line. Also runnable as `python -m orchestrator.cli`."""
from __future__ import annotations

import logging
import sys

import click

from .spec import JobSpec, SpecError, dump_spec, load_spec
from .stages import STAGES, init_ray

EXIT_BAD_SPEC = 2
log = logging.getLogger("imitate_orch")


def load_or_exit(job: str, overrides: tuple[str, ...]) -> JobSpec:
    """Validate the job spec before anything starts; a bad one exits 2 naming its fields."""
    try:
        return load_spec(job, list(overrides))
    except SpecError as e:
        click.echo(f"error: invalid job spec\n{e}", err=True)
        sys.exit(EXIT_BAD_SPEC)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="imitate-orch: %(message)s",
                        stream=sys.stderr)
    for noisy in ("mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="Override a spec field, e.g. --set student.lambda2=0.01 (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """imitate-NAT on Ray: train, distill, sweep and serve non-autoregressive translation."""


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@set_option
@click.option("--address", default=None, help="Join an existing Ray cluster (e.g. auto, ray://host:10001). "
              "Default: start a local one.")
@click.option("--force", type=click.Choice(STAGES), default=None, help="Rerun this stage and all after it.")
@click.option("--until", type=click.Choice(STAGES), default=None, help="Stop after this stage.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
@click.option("-v", "--verbose", is_flag=True)
def run(job, overrides, address, force, until, no_progress, verbose) -> None:
    """Run the pipeline of JOB: prepare → tokenizer → teacher → distill → student → evaluate.

    Finished stages are reused; an interrupted stage resumes. Results go to
    <workdir>/<job>/ and to MLflow."""
    spec = load_or_exit(job, overrides)
    setup_logging(verbose)
    from .pipeline import StageFailed, run_dir, run_pipeline

    init_ray(spec, address)
    try:
        run_pipeline(spec, job, force=force, until=until, progress=not no_progress)
    except StageFailed as e:
        click.echo(f"\nerror: {e}\n  The stage's MLflow run is marked FAILED and its manifest records the error.\n"
                   f"  Finished stages are kept: fix the cause and rerun the same command to resume.", err=True)
        if verbose:
            raise
        sys.exit(1)
    summary = run_dir(spec) / "evaluate" / "summary.md"
    if summary.is_file():
        click.echo(f"\n{spec.name}: test set results\n\n{summary.read_text()}")
    click.echo(f"run dir: {run_dir(spec)}")


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@set_option
def status(job, overrides) -> None:
    """Show each stage's state for JOB (done, running, failed, stale, pending)."""
    spec = load_or_exit(job, overrides)
    from .pipeline import run_dir, stage_states

    click.echo(f"{spec.name}  ({run_dir(spec)})")
    for s in stage_states(spec):
        m = s.manifest
        when = (m.finished or m.started or "") if m else ""
        extra = f"  error: {m.error}" if m and m.error and s.state == "failed" else ""
        click.echo(f"  {s.stage:<10} {s.state:<8} {when}{extra}")


@main.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--src", "src_path", required=True, type=click.Path(dir_okay=False), help="Source sentences, one per line.")
@click.option("--ref", "ref_path", required=True, type=click.Path(dir_okay=False), help="References, line-aligned with --src.")
@click.option("--delta-t", type=click.IntRange(0, 20), default=3, show_default=True, help="LPD: lengths T̂-ΔT … T̂+ΔT.")
@click.option("--beam", type=click.IntRange(1, 64), default=4, show_default=True, help="AT beam size.")
@click.option("--batch-tokens", type=click.IntRange(1), default=4096, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def eval_cmd(run_dir, src_path, ref_path, delta_t, beam, batch_tokens, as_json) -> None:
    """Score any parallel test set with a finished run's models: AT beam, NAT, NAT+LPD."""
    import json
    from pathlib import Path

    from imitate_nat.checkpoint import CheckpointError
    from imitate_nat.data import read_parallel

    from .stages.evaluate import load_run_models, score_all

    import torch

    rd = Path(run_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        src, ref = read_parallel(src_path, ref_path)
        tok, at, nat = load_run_models(rd, device)
    except (OSError, ValueError, CheckpointError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BAD_SPEC)
    if not src:
        click.echo(f"error: {src_path} is empty", err=True)
        sys.exit(EXIT_BAD_SPEC)
    rows, _ = score_all(at, nat, tok, src, ref, beam, delta_t, batch_tokens, device)
    if as_json:
        click.echo(json.dumps({"run_dir": str(rd), "sentences": len(src), "beam": beam, "delta_t": delta_t,
                               "rows": rows}, indent=2))
        return
    labels = {"at": f"AT beam {beam}", "nat": "NAT", "lpd": f"NAT+LPD ΔT={delta_t}"}
    click.echo(f"{len(src)} sentences\n{'model':<16}{'BLEU':>8}{'chrF':>8}")
    for name, r in rows.items():
        click.echo(f"{labels[name]:<16}{r['bleu']:>8.2f}{r['chrf']:>8.2f}")
    click.echo(f"BLEU: {rows['at']['bleu_signature']}\nchrF: {rows['at']['chrf_signature']}")


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
