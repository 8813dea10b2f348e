"""What every `imitate-orch` command shares: refusing bad input (exit 2), loading a job spec,
checking it fits the Ray cluster, logging, and the JOB argument and --set option."""
from __future__ import annotations

import logging
import sys
from typing import NoReturn

import click

from imitate_nat.config import CPU_MODES

from .shipped_jobs import job_path
from .spec.loading import SpecError, load_spec
from .spec.schema import JobSpec

EXIT_USAGE = 2   # bad input (spec, arguments, files, an unfinished run): nothing was started


def show_progress(no_progress: bool) -> bool:
    """Progress bars (and Tune's status tables) unless --no-progress, and only on a terminal:
    written to a log file, every redraw of a bar would be another line."""
    return not no_progress and sys.stderr.isatty()


def fail(message) -> NoReturn:
    """Refuse bad input: the message on stderr, exit 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def load_or_exit(job: str, overrides: tuple[str, ...]) -> JobSpec:
    """Validate the job spec before anything starts; a bad one exits 2 naming its fields."""
    try:
        return load_spec(job, list(overrides))
    except SpecError as e:
        fail(f"invalid job spec\n{e}")


def start_ray_or_exit(spec: JobSpec, address: str | None) -> None:
    """Join or start the Ray cluster (run/cluster.py's init_ray); a local one that does not come
    up is an error message and exit 1, not a traceback."""
    from .run.cluster import ClusterStartError, init_ray

    try:
        init_ray(spec, address)
    except ClusterStartError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


def check_cluster_or_exit(spec: JobSpec):
    """Right after connecting to Ray, before any stage: a worker group or actor the cluster cannot
    place would wait for ever, and a work dir some node does not see would fail a stage hours in;
    both exit 2 naming the field. Returns the work dir probe (run/workdir.py): the caller probes
    the nodes an autoscaler adds before each stage, and closes it at the end."""
    import ray

    from .run.cluster import check_fits_cluster
    from .run.workdir import WorkdirProbe

    probe = None
    try:
        check_fits_cluster(spec)
        probe = WorkdirProbe(spec.workdir)
        probe.check_new_nodes()
        return probe
    except SpecError as e:
        if probe:
            probe.close()
        ray.shutdown()   # a local cluster started for this run goes away; a joined one stays
        fail(f"the job cannot run on this Ray cluster (no stage was started)\n{e}")


def run_source(ctx, param, value: str | None) -> str | None:
    """--run: a models:/ URI as it is, else a run directory that exists (click's checks)."""
    keep = value is None or value.startswith("models:/")
    return value if keep else click.Path(exists=True, file_okay=False).convert(value, param, ctx)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="imitate-orch: %(message)s",
                        stream=sys.stderr)
    for noisy in ("mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


job_argument = click.argument("job", type=click.Path(dir_okay=False), callback=lambda _ctx, _param, v: job_path(v))
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="Override a spec field, e.g. --set student.lambda2=0.01 (repeatable).")
cpu_fast_option = click.option("--cpu-fast", type=click.Choice(CPU_MODES), default=None,
                               help="On a CPU, decode in int8 or bf16 (auto: bf16 on CPUs with AMX, else int8; "
                                    "off: fp32). Default: the job's eval.cpu_fast, auto. No effect on a GPU.")
