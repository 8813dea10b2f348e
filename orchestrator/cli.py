"""The `imitate-orch` command line. Also runnable as `python -m orchestrator.cli`."""
from __future__ import annotations

import logging
import sys

import click

from .cli_common import (EXIT_USAGE, check_cluster_or_exit, cpu_fast_option, fail, job_argument, load_or_exit,
                         run_source, set_option, setup_logging, show_progress, start_ray_or_exit)
from .cli_studies import STUDY_COMMANDS
from .run.layout import DECODERS, STAGES
from .run.manifest import package_version
from .shipped_jobs import JobCopyError, copy_job, jobs_table
from .spec.loading import SpecError, dump_spec
from .translate_stream import PIPE_BUFFER_SIZE


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_version(), "--version", prog_name="imitate-orch", message="%(prog)s %(version)s")
def main() -> None:
    """imitate-NAT on Ray: train, distill, sweep and serve non-autoregressive translation."""


@main.command()
@job_argument
@set_option
@click.option("--address", default=None, help="Join an existing Ray cluster (e.g. auto, ray://host:10001). "
              "Default: start a local one.")
@click.option("--force", type=click.Choice(STAGES), default=None, help="Rerun this stage and all after it.")
@click.option("--until", type=click.Choice(STAGES), default=None, help="Stop after this stage.")
@click.option("--no-progress", is_flag=True, help="No progress bars (drawn only on a terminal anyway).")
@click.option("-v", "--verbose", is_flag=True)
def run(job, overrides, address, force, until, no_progress, verbose) -> None:
    """Run the pipeline of JOB: prepare → tokenizer → teacher → distill → student → evaluate.

    Finished stages are reused; an interrupted stage resumes. Results go to
    <workdir>/<job>/ and to MLflow. One run of a job at a time: a second exits 2."""
    spec = load_or_exit(job, overrides)
    setup_logging(verbose)
    from contextlib import ExitStack

    from .pipeline import nothing_to_run, run_pipeline
    from .run.layout import run_dir
    from .run.runner import StageFailed
    from .run.sharing import RunLocked, run_lock

    probe = None
    if nothing_to_run(spec, force, until):
        logging.getLogger("imitate_orch").info("every stage is done: reusing them without a Ray cluster")
    else:
        start_ray_or_exit(spec, address)
        probe = check_cluster_or_exit(spec)
    held = ExitStack()
    try:   # after the cluster checks, which leave no file behind when they refuse the job
        held.enter_context(run_lock(run_dir(spec)))
    except RunLocked as e:
        if probe:
            probe.close()
        fail(e)
    with held:
        try:
            run_pipeline(spec, job, force=force, until=until, progress=show_progress(no_progress),
                         before_stage=probe.check_new_nodes if probe else None)
        except SpecError as e:   # a node the autoscaler added does not see the work dir
            fail(f"the job cannot go on on this Ray cluster (finished stages are kept)\n{e}")
        except StageFailed as e:
            click.echo(f"\nerror: {e}\n  The stage's MLflow run is marked FAILED and its manifest records the error.\n"
                       f"  Finished stages are kept: fix the cause and rerun the same command to resume.", err=True)
            if verbose:
                raise
            sys.exit(1)
        finally:
            if probe:
                probe.close()
    summary = run_dir(spec) / "evaluate" / "summary.md"
    if summary.is_file():
        click.echo(f"\n{spec.name}: test set results\n\n{summary.read_text()}")
    click.echo(f"run dir: {run_dir(spec)}")


@main.command()
@job_argument
@set_option
def status(job, overrides) -> None:
    """Show each stage's state for JOB (done, running, failed, stale, damaged, pending, or extend:
    trained for fewer steps than JOB asks, to be extended from its last checkpoint)."""
    spec = load_or_exit(job, overrides)
    from .run.hashing import max_steps
    from .run.layout import run_dir
    from .run.runner import stage_states

    click.echo(f"{spec.name}  ({run_dir(spec)})")
    for s in stage_states(spec):
        m = s.manifest
        when = (m.finished or m.started or "") if m else ""
        extra = f"  error: {m.error}" if m and m.error and s.state == "failed" else ""
        if s.state == "extend":
            extra = f"  trained to max_steps {m.max_steps}, the job asks {max_steps(spec, s.stage)}"
        if m and "averaged_kept" in m.metrics:   # a training stage that averaged checkpoints
            kept = "the average" if m.metrics["averaged_kept"] else "the best checkpoint"
            extra += (f"  model.pt: {kept} (valid BLEU: average {m.metrics['averaged_valid_bleu']:.2f}, "
                      f"best checkpoint {m.metrics['best_valid_bleu']:.2f})")
        if m and m.package_version:
            extra += f"  (imitate-orch {m.package_version})"
        click.echo(f"  {s.stage:<10} {s.state:<8} {when}{extra}")


@main.command()
@job_argument
@set_option
@click.option("--num-samples", type=click.IntRange(1), default=None, help="Trials (default: sweep.num_samples).")
@click.option("--max-concurrent", type=click.IntRange(1), default=None,
              help="Trials running at once (default: sweep.max_concurrent).")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming <workdir>/<job>-sweep "
              "(teachers already trained there are kept and reused).")
@click.option("--address", default=None, help="Join an existing Ray cluster (e.g. auto). Default: start a local one.")
@click.option("--no-progress", is_flag=True, help="No Tune status tables (drawn only on a terminal anyway).")
@click.option("-v", "--verbose", is_flag=True)
def sweep(job, overrides, num_samples, max_concurrent, fresh, address, no_progress, verbose) -> None:
    """Tune λ1, λ2 and the action count of JOB with Ray Tune (ASHA), ΔT on every trained student.

    The search space comes from the job's `sweep:` section. Trials share teachers by config hash;
    results, plots and the best configuration as a ready-to-run job (best.yaml) go to
    <workdir>/<job>-sweep/ and to MLflow. Rerunning the same command resumes an interrupted sweep."""
    sets = [*([f"sweep.num_samples={num_samples}"] if num_samples else []),
            *([f"sweep.max_concurrent={max_concurrent}"] if max_concurrent else [])]
    spec = load_or_exit(job, (*overrides, *sets))
    setup_logging(verbose)
    from .sweep.driver import SweepError, check_same_job, run_sweep, sweep_dir

    try:
        sweep_dir(spec).mkdir(parents=True, exist_ok=True)
        check_same_job(sweep_dir(spec), spec, fresh)  # before Ray starts; run_sweep checks again
    except SweepError as e:
        fail(e)
    start_ray_or_exit(spec, address)
    check_cluster_or_exit(spec).close()  # trials use the job's teacher, distill and student resources
    try:
        out = run_sweep(spec, job, progress=show_progress(no_progress), echo=click.echo)
    except KeyboardInterrupt:
        click.echo(f"interrupted: rerun the same command to resume the sweep in {sweep_dir(spec)}", err=True)
        sys.exit(130)
    click.echo(f"sweep dir: {sweep_dir(spec)}")
    if out["best"] is None:
        sys.exit(1)


@main.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--src", "src_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Source sentences, one per line.")
@click.option("--ref", "ref_paths", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="References, line-aligned with --src; repeat it for several references per sentence.")
@click.option("--decoders", "decoder_names", default=",".join(DECODERS), show_default=True,
              help="The decoders to run, comma-separated: at (beam search), nat (one pass), lpd (NAT+LPD).")
@click.option("--tokenize", default=None, help="sacreBLEU's BLEU tokenizer: 13a, intl, zh, char, none, ja-mecab, ... "
              "(default: the job's eval.bleu_tokenize, 13a).")
@click.option("--hyp-dir", type=click.Path(file_okay=False), default=None,
              help="Write each decoder's translations to HYP_DIR/<decoder>.txt, one line per source line.")
@click.option("--delta-t", type=click.IntRange(0, 20), default=None, help="LPD: lengths T̂-ΔT … T̂+ΔT (default: the job's eval.delta_t, 3).")
@click.option("--beam", type=click.IntRange(1, 64), default=None, help="AT beam size (default: the job's eval.beam_size, 4).")
@click.option("--batch-tokens", type=click.IntRange(1), default=None, help="(default: the job's eval.batch_tokens, 4096)")
@cpu_fast_option
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def eval_cmd(run_dir, src_path, ref_paths, decoder_names, tokenize, hyp_dir, delta_t, beam, batch_tokens, cpu_fast,
             as_json) -> None:
    """Score any parallel test set with a finished run's models (AT beam, NAT, NAT+LPD): BLEU, chrF, TER.

    RUN_DIR: a run directory, or a registered model (models:/NAME/VERSION, models:/NAME@ALIAS)."""
    from .eval_cmd import EvalSetupError, format_scores, run_eval

    try:
        result = run_eval(run_dir, src_path, ref_paths, decoder_names, tokenize, hyp_dir, delta_t, beam, batch_tokens,
                          cpu_fast)
    except EvalSetupError as e:
        fail(e)
    click.echo(format_scores(result, as_json))


@main.command()
@job_argument
@set_option
@click.option("--show", is_flag=True, help="Print the full spec with defaults filled in.")
def validate(job: str, overrides: tuple[str, ...], show: bool) -> None:
    """Check a job spec (exit 2 if invalid) without running anything."""
    spec = load_or_exit(job, overrides)
    click.echo(dump_spec(spec) if show else f"{job}: valid job spec '{spec.name}'")


@main.group(invoke_without_command=True)
@click.pass_context
def jobs(ctx) -> None:
    """List the job specs shipped with imitate-orch; a JOB argument can name one (`validate tiny`)."""
    if ctx.invoked_subcommand is None:
        click.echo(jobs_table())


@jobs.command("copy")
@click.argument("name")
@click.argument("dest", required=False, type=click.Path())
def jobs_copy(name, dest) -> None:
    """Copy shipped job NAME to DEST (default ./NAME.yaml) to edit; an existing file is kept (exit 2)."""
    try:
        click.echo(f"wrote {copy_job(name, dest)}")
    except JobCopyError as e:
        fail(e)


@main.command()
@click.argument("source")
@set_option
@click.option("--host", default=None, help="Bind address (default: serve.host = 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="HTTP port (default: serve.port = 8000).")
@click.option("--replicas", type=click.IntRange(1), default=None, help="Replicas (default: serve.replicas).")
@click.option("--delta-t", type=click.IntRange(0, 20), default=None, help="Default LPD ΔT (default: eval.delta_t).")
@click.option("--max-batch-size", type=click.IntRange(1), default=None, help="Requests per batch (default: serve.max_batch_size).")
@cpu_fast_option
@click.option("--tracking-uri", default=None, help="MLflow store for a run id (default: $MLFLOW_TRACKING_URI, else ./runs/mlflow.db).")
@click.option("--address", default=None, help="Join an existing Ray cluster. Default: start a local one.")
@click.option("-v", "--verbose", is_flag=True)
def serve(source, overrides, host, port, replicas, delta_t, max_batch_size, cpu_fast, tracking_uri, address,
          verbose) -> None:
    """Serve a finished run's NAT + LPD over HTTP (Ray Serve) until Ctrl-C.

    SOURCE: a run directory, a job YAML (its run directory), an MLflow run id or a registered
    model (models:/NAME/VERSION, models:/NAME@ALIAS).
    API: POST /translate {"text": ...} or {"texts": [...]}, GET /health, docs at /docs."""
    from pathlib import Path

    from .run.layout import RunNotReady
    from .serve.server import run_server
    from .serve.target import ServeSetupError, flag_overrides, resolve_target

    sets = (*overrides, *flag_overrides(host, port, replicas, delta_t, max_batch_size, cpu_fast))
    spec = load_or_exit(source, sets) if Path(source).is_file() else None
    try:
        target = resolve_target(source, sets, tracking_uri, spec)
    except (RunNotReady, ServeSetupError, SpecError) as e:
        fail(e)
    setup_logging(verbose)
    sys.exit(run_server(target, address))


@main.command("translate")
@click.argument("texts", nargs=-1)
@click.option("--run", "run_path", default=None, callback=run_source,
              help="A finished run directory, or models:/NAME/VERSION or models:/NAME@ALIAS: translate here.")
@click.option("--url", default=None, help="A running `imitate-orch serve`, e.g. http://127.0.0.1:8000: translate there.")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False, allow_dash=True), default="-",
              show_default=True, help="Source lines (- is stdin); instead of TEXTS.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              show_default=True, help="Where the translations go (- is stdout).")
@click.option("--decoder", type=click.Choice(DECODERS), default=None,
              help="With --run: lpd (NAT + LPD, the default), nat (one pass) or at (the teacher's beam search).")
@click.option("--delta-t", type=click.IntRange(0, 20), default=None,
              help="LPD ΔT (default: the job's eval.delta_t; with --url the server's).")
@cpu_fast_option
@click.option("--buffer-size", type=click.IntRange(1), default=None,
              help=f"Lines read, translated and written at a time (default: 1 from a terminal, else {PIPE_BUFFER_SIZE}).")
@click.option("--no-progress", is_flag=True, help="No progress bar (drawn only when reading a file, on a terminal).")
@click.option("--retries", type=click.IntRange(0), default=5, show_default=True,
              help="With --url: retries on connection errors, 429 and 5xx (exponential backoff).")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=60.0, show_default=True,
              help="With --url: seconds per attempt.")
@click.option("-v", "--verbose", is_flag=True)
def translate_cmd(texts, run_path, url, input_path, output_path, decoder, delta_t, cpu_fast, buffer_size,
                  no_progress, retries, timeout, verbose) -> None:
    """Translate TEXTS, or the lines of --input: one output line per input line.

    --run RUN_DIR decodes here with a finished run's models and its job's eval settings (beam
    size, ΔT, length penalty, batch tokens); --url sends the lines to `imitate-orch serve`.
    Lines are read --buffer-size at a time, translated as a batch, written and flushed."""
    from .serve.client import ServeRequestError
    from .translate_stream import TranslateSetupError, run_translate

    setup_logging(verbose)
    try:
        run_translate(texts, run_path, url, input_path, output_path, decoder, delta_t, buffer_size,
                      progress=show_progress(no_progress), retries=retries, timeout_s=timeout, cpu_fast=cpu_fast)
    except TranslateSetupError as e:
        fail(e)
    except ServeRequestError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USAGE if e.status and 400 <= e.status < 500 else 1)


for command in STUDY_COMMANDS:
    main.add_command(command)

if __name__ == "__main__":
    main()
