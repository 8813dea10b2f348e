"""Shared fixtures: a real local Ray runtime and a small prepared run directory."""
import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray 2.60 turns token auth on for every later process once ~/.ray/auth_token exists (the
# two-node script makes one): tests and their subprocesses run their local clusters without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# DeepSpeed JIT-compiles a CPU comm op on first use; keep it across test runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))

# A model small enough that Ray Train tests spend their time on the machinery.
MICRO_MODEL = {"size": "tiny", "d_model": 32, "n_heads": 2, "d_ffn": 64, "enc_layers": 1, "dec_layers": 1,
               "n_actions": 8}


def micro_train(**kw):
    base = {"max_steps": 20, "batch_tokens": 1024, "eval_every": 10, "checkpoint_every": 10, "log_every": 1,
            "warmup_steps": 5, "lr": 1e-3}
    return {**base, **kw}


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024 ** 2,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory):
    """prepare + tokenizer stages on a small synthetic corpus; returns (run_dir, base spec dict)."""
    from orchestrator.spec_io import spec_from_dict
    from orchestrator.stages import StageContext
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


# tiny.yaml shrunk so the whole pipeline runs in about a minute on 2 cores.
MICRO_JOB_SETS = ["data.synthetic.train_size=600", "data.synthetic.valid_size=60", "data.synthetic.test_size=40",
                  "tokenizer.vocab_size=400", "model.d_model=32", "model.n_heads=2", "model.d_ffn=64",
                  "model.n_actions=16", "teacher.max_steps=30", "student.max_steps=30", "teacher.eval_every=15",
                  "student.eval_every=15", "teacher.checkpoint_every=15", "student.checkpoint_every=15",
                  "distill.shards=4", "teacher.log_every=5", "eval.latency_sentences=3"]


def micro_job_spec(workdir, *extra):
    """jobs/tiny.yaml with MICRO_JOB_SETS and `extra` overrides, working in `workdir`."""
    from pathlib import Path

    from orchestrator.spec_io import load_spec

    root = Path(__file__).resolve().parents[1]
    return load_spec(str(root / "jobs" / "tiny.yaml"), [f"workdir={workdir}", *MICRO_JOB_SETS, *extra])


@pytest.fixture(scope="session")
def micro_run(ray_local, tmp_path_factory):
    """A finished micro pipeline run (all six stages, in-process, MLflow on SQLite).
    Returns (run_dir, spec). Read-only for tests: copy it before changing anything."""
    from orchestrator.pipeline import run_dir, run_pipeline

    spec = micro_job_spec(tmp_path_factory.mktemp("micro") / "runs")
    run_pipeline(spec, "jobs/tiny.yaml", progress=False)
    return run_dir(spec), spec


def copy_micro_workdir(micro, dst):
    """A writable copy of micro_run's work dir (run dir, MLflow SQLite store, artifacts) at
    `dst`, with the store's artifact locations moved along so logging to the copy never writes
    into the original. Returns (run_dir, spec) of the copy."""
    import shutil
    import sqlite3

    rd, spec = micro
    src = rd.parent
    shutil.copytree(src, dst, symlinks=True)
    con = sqlite3.connect(dst / "mlflow.db")
    with con:
        con.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (str(src), str(dst)))
        con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (str(src), str(dst)))
    con.close()
    # MLflow caches each run's artifact store by run id for the whole process, and the copy's
    # runs keep the original's ids: forget the cached stores (private, test-only) so that
    # logging to a copied run resolves the copy's location.
    from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils

    getattr(mlflow_tracking_utils, "_artifact_repos_cache", {}).clear()
    return dst / rd.name, micro_job_spec(dst)
