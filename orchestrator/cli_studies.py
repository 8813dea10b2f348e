"""The study commands of `imitate-orch`: `ablate` (Table 2), `report` (the paper's tables and
figures for a run) and `diagnose` (does the student imitate?)."""
from __future__ import annotations

import sys

import click

from .cli_common import (check_cluster_or_exit, fail, job_argument, load_or_exit, set_option, setup_logging,
                         show_progress, start_ray_or_exit)
from .studies.ablate import VARIANTS


@click.command()
@job_argument
@set_option
@click.option("--lambda1-zero-teacher", is_flag=True,
              help="Also train a teacher with λ1 = 0, for the action-usage comparison (Figure 4) in `report`.")
@click.option("--only", multiple=True, type=click.Choice([v.name for v in VARIANTS]),
              help="Run only this variant (repeatable); variants finished earlier still fill their rows. "
                   "For splitting the ablation over several sittings.")
@click.option("--seeds", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Train each variant's student with this many seeds (the job's seed, +1, ...): the table gives "
                   "mean ± std and paired bootstrap p-values between rows.")
@click.option("--address", default=None, help="Join an existing Ray cluster. Default: start a local one.")
@click.option("--no-progress", is_flag=True, help="No progress bars (drawn only on a terminal anyway).")
@click.option("-v", "--verbose", is_flag=True)
def ablate(job, overrides, lambda1_zero_teacher, only, seeds, address, no_progress, verbose) -> None:
    """Run the paper's ablation (Table 2) of JOB: raw vs distilled targets, UniformCopy vs
    SoftCopy, imitation on/off (a NAT without imitation modules; and one with the modules but
    no imitation loss), LPD on/off.

    Variants share one teacher and one distillation (the job's own, when done). Results go to
    <workdir>/<job>-ablate/ (ablation.md, ablation.json, one run dir per variant and seed) and MLflow."""
    spec = load_or_exit(job, overrides)
    setup_logging(verbose)
    from .run.runner import StageFailed
    from .studies.ablate import ablation_dir, run_ablation, table2_markdown

    start_ray_or_exit(spec, address)
    check_cluster_or_exit(spec).close()
    try:
        result = run_ablation(spec, job, lambda1_zero_teacher=lambda1_zero_teacher, progress=show_progress(no_progress),
                              echo=lambda m: click.echo(m, err=True), only=only, seeds=seeds)
    except StageFailed as e:
        click.echo(f"\nerror: {e}\n  Finished stages and variants are kept: rerun the same command to resume.", err=True)
        if verbose:
            raise
        sys.exit(1)
    click.echo(f"\n{spec.name}: ablation (Table 2)\n\n{table2_markdown(result)}\nwritten to {ablation_dir(spec)}")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--job", "job", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The job spec (default: the job.yaml of the run's MLflow run).")
@set_option
@click.option("--compare-teacher", type=click.Path(exists=True), default=None,
              help="A teacher trained with λ1 = 0 (its run dir, or a model.pt using this run's tokenizer) for the "
                   "action-usage comparison. Default: the one `ablate --lambda1-zero-teacher` trained, if any.")
@click.option("--max-delta-t", type=click.IntRange(0, 20), default=None,
              help="BLEU/latency vs ΔT for ΔT = 0..this (default: eval.delta_t).")
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True,
              help="Set decoded for the ΔT sweep and the action usage.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output dir (default: RUN_DIR/report).")
@click.option("--tracking-uri", default=None,
              help="MLflow store (default: the job's, else $MLFLOW_TRACKING_URI, else <workdir>/mlflow.db).")
@click.option("--no-progress", is_flag=True, help="No progress bars (drawn only on a terminal anyway).")
def report(run_dir, job, overrides, compare_teacher, max_delta_t, split, out, tracking_uri, no_progress) -> None:
    """Write RUN_DIR/report/report.md with PNG plots (also logged to MLflow): results (Table 1),
    ablation (Table 2), training curves, BLEU and latency vs ΔT, action usage (Figure 4)."""
    from .run.layout import RunNotReady
    from .studies.report import write_report

    if overrides and not job:
        fail("--set needs --job")
    spec = load_or_exit(job, overrides) if job else None
    try:
        path = write_report(run_dir, out, spec, tracking_uri, compare_teacher, max_delta_t, split,
                            progress=show_progress(no_progress), echo=lambda m: click.echo(m, err=True))
    except (RunNotReady, ValueError, OSError) as e:
        fail(e)
    click.echo(f"report: {path}")


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--student", "students", multiple=True, type=click.Path(exists=True),
              help="Another student to compare (its run dir, or a model.pt of this job's vocabulary); repeatable.")
@click.option("--ablation", is_flag=True,
              help="Also every finished variant of the job's ablation (<workdir>/<job>-ablate) with this run's teacher.")
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True)
@click.option("--bleu-sentences", type=click.IntRange(1), default=500, show_default=True,
              help="Sentences decoded for the demonstrator's BLEU with and without u.")
@click.option("--beam", type=click.IntRange(1), default=4, show_default=True, help="Beam of those decodings.")
def diagnose(run_dir, students, ablation, split, bleu_sentences, beam) -> None:
    """Does imitation work in RUN_DIR? Per decoder layer, teacher-forced: the demonstrator's
    policy entropy, ‖u‖/‖o‖ and action-token mutual information, its BLEU with u zeroed, and
    how closely each student's policies follow it (cross-entropy, KL, argmax agreement).
    Writes RUN_DIR/diagnostics/diagnostics.md and .json."""
    from .run.layout import RunNotReady
    from .studies.diagnose import diagnostics_markdown, run_diagnostics

    try:
        result = run_diagnostics(run_dir, split, students, ablation, bleu_sentences, beam,
                                 echo=lambda m: click.echo(m, err=True))
    except (RunNotReady, ValueError, OSError) as e:
        fail(e)
    click.echo(diagnostics_markdown(result))
    click.echo(f"written to {result['run_dir']}/diagnostics/")


STUDY_COMMANDS = (ablate, report, diagnose)
