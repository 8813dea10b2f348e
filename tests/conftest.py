"""Shared fixtures: a real local Ray runtime and a small prepared run directory (plain helpers
live in helpers.py)."""
import os

import pytest

from helpers import MICRO_MODEL, free_port, micro_job_spec

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray 2.60 turns token auth on for every later process once ~/.ray/auth_token exists (the
# two-node script makes one): tests and their subprocesses run their local clusters without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# Ray Train's controller polls its workers every 2 s, so each of the suite's many micro training
# runs waited up to 2 s to start and again to end; polling faster changes no result.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # No dashboard, and its recorded port one nothing listens on (as init_ray does): Ray's
        # state API must not ask another cluster's dashboard on 8265 about this one's actors.
        ray.init(num_cpus=2, include_dashboard=False, dashboard_port=free_port(), object_store_memory=150 * 1024 ** 2,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared_run(ray_local, tmp_path_factory):
    """prepare + tokenizer stages (the train set binarized by Ray tasks) on a small synthetic
    corpus; returns (run_dir, base spec dict)."""
    from orchestrator.run.runner import StageContext
    from orchestrator.spec.loading import spec_from_dict
    from orchestrator.stages.prepare import prepare
    from orchestrator.stages.tokenizer import tokenizer

    run_dir = tmp_path_factory.mktemp("run")
    raw = {"name": "t", "data": {"synthetic": {"train_size": 400, "valid_size": 60, "test_size": 40}},
           "tokenizer": {"vocab_size": 400}, "model": MICRO_MODEL}
    spec = spec_from_dict(raw)
    for stage, fn in (("prepare", prepare), ("tokenizer", tokenizer)):
        (run_dir / stage).mkdir(parents=True, exist_ok=True)
        fn(StageContext(spec, run_dir, stage, progress=False))
    return run_dir, raw


@pytest.fixture(scope="session")
def micro_run(ray_local, tmp_path_factory):
    """A finished micro pipeline run (all six stages, in-process, MLflow on SQLite).
    Returns (run_dir, spec). Read-only for tests: copy it before changing anything."""
    from orchestrator.pipeline import run_pipeline
    from orchestrator.run.layout import run_dir

    spec = micro_job_spec(tmp_path_factory.mktemp("micro") / "runs")
    run_pipeline(spec, "jobs/tiny.yaml", progress=False)
    return run_dir(spec), spec
