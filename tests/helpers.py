"""Plain helpers shared by the tests (fixtures are in conftest.py)."""
from pathlib import Path

from orchestrator.run import cluster

free_port = cluster.free_port   # one helper for the tests, the bench and init_ray

ROOT = Path(__file__).resolve().parents[1]   # the repository


# A model small enough that Ray Train tests spend their time on the machinery.
MICRO_MODEL = {"size": "tiny", "d_model": 32, "n_heads": 2, "d_ffn": 64, "enc_layers": 1, "dec_layers": 1,
               "n_actions": 8}


def micro_train(**kw):
    base = {"max_steps": 20, "batch_tokens": 1024, "eval_every": 10, "checkpoint_every": 10, "log_every": 1,
            "warmup_steps": 5, "lr": 1e-3}
    return {**base, **kw}


# tiny.yaml shrunk so the whole pipeline runs in about a minute on 2 cores.
MICRO_JOB_SETS = ["data.synthetic.train_size=600", "data.synthetic.valid_size=60", "data.synthetic.test_size=40",
                  "tokenizer.vocab_size=400", "model.d_model=32", "model.n_heads=2", "model.d_ffn=64",
                  "model.n_actions=16", "teacher.max_steps=30", "student.max_steps=30", "teacher.eval_every=15",
                  "student.eval_every=15", "teacher.checkpoint_every=15", "student.checkpoint_every=15",
                  "distill.shards=4", "teacher.log_every=5", "eval.latency_sentences=3",
                  # A CLI run starting its own local Ray: no dashboard (~9 processes, 14 CPU-s).
                  "ray.include_dashboard=false",
                  # The CPU path in bf16, not auto: where auto means int8 a translation often changes
                  # with its batch, and tests compare translations decoded in different batches (a
                  # server's against offline, line by line against a whole file). Native bf16 changes
                  # one now and then (README, "Decoding on a CPU"): offline batches as the server does.
                  "eval.cpu_fast=bf16"]


def micro_job_spec(workdir, *extra):
    """jobs/tiny.yaml with MICRO_JOB_SETS and `extra` overrides, working in `workdir`."""
    from orchestrator.spec.loading import load_spec

    return load_spec(str(ROOT / "jobs" / "tiny.yaml"), [f"workdir={workdir}", *MICRO_JOB_SETS, *extra])


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
        con.execute("UPDATE model_versions SET source = replace(source, ?, ?), "   # the registered models
                    "storage_location = replace(storage_location, ?, ?)", (str(src), str(dst)) * 2)
    con.close()
    # MLflow caches each run's artifact store by run id for the whole process, and the copy's
    # runs keep the original's ids: forget the cached stores (private, test-only) so that
    # logging to a copied run resolves the copy's location.
    from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils

    getattr(mlflow_tracking_utils, "_artifact_repos_cache", {}).clear()
    return dst / rd.name, micro_job_spec(dst)


def fake_stages(monkeypatch, label=lambda stage: stage, source=lambda stage: ""):
    """Every stage of the pipeline replaced by a cheap fake: stage S writes out.txt =
    f"{label(S)}({source(S)}{the out.txt of every stage before S})". Returns the list the
    fakes append their stage names to as they run."""
    import dataclasses

    from orchestrator import pipeline
    from orchestrator.run import runner
    from orchestrator.run.layout import STAGE_TABLE, STAGES
    from orchestrator.run.runner import StageResult

    calls = []

    def fake(stage):
        def run(ctx):
            calls.append(stage)
            upstream = "".join((ctx.run_dir / s / "out.txt").read_text() for s in STAGES[: STAGES.index(stage)])
            (ctx.out_dir / "out.txt").write_text(f"{label(stage)}({source(stage)}{upstream})")
            return StageResult(outputs={"out.txt": "out.txt"})
        return run

    monkeypatch.setattr(pipeline, "stage_functions", lambda: {s: fake(s) for s in STAGES})
    monkeypatch.setattr(runner, "STAGE", {s.name: dataclasses.replace(s, logged=()) for s in STAGE_TABLE})
    return calls
