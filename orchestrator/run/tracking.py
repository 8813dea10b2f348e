"""MLflow at the edge: one parent run per job (or sweep), a nested run per stage (or trial).

Everything goes through an explicit ``MlflowClient`` bound to one tracking URI, never the
fluent API's process-global active run, so several trackers (tests, Ray workers) can
coexist. ``Tracker.disabled()`` gives the same interface with no-op handles, so stages run
without MLflow in unit tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

from ..spec.schema import JobSpec

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation); duplicated so importing this module stays cheap.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
# On each stage run: the sha256 of each output its manifest recorded. serve finds the run that
# logged a model file by these bytes, not by when it ran (serve/target.py).
OUTPUT_TAG = "sha256.{}"


def resolve_tracking_uri(spec_uri: str | None, workdir: str | os.PathLike) -> str:
    """The job's URI, else $MLFLOW_TRACKING_URI, else a SQLite file in the work dir.

    SQLite rather than ./mlruns: MLflow 3 refuses plain file stores unless told to.
    """
    if spec_uri:
        return spec_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def store_client(uri: str):
    """An MlflowClient for the store at `uri`, or None for a SQLite file that does not exist:
    looking for runs (serve, eval, report) must not create an empty store as a side effect.
    What it downloads are small files (job.yaml, models): no progress bar per file."""
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(tracking_uri=uri)


def default_artifact_root(workdir: str | os.PathLike) -> Path:
    return Path(workdir).resolve() / "mlartifacts"


def _truncate(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunHandle:
    """Logging calls bound to one MLflow run. Writes are synchronous so that, once a context
    exits, everything it logged is in the store (no async queue to flush)."""

    def __init__(self, client: Any, run_id: str):
        self._client = client
        self.run_id = run_id

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step=step)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = _now_ms()
        self._log_metric_items([Metric(k, float(v), ts, step or 0) for k, v in metrics.items()])

    def log_history(self, key: str, points: list) -> None:
        """A whole curve of one metric, [[step, value], ...], in as few calls as MLflow allows."""
        from mlflow.entities import Metric

        ts = _now_ms()
        self._log_metric_items([Metric(key, float(v), ts, int(step)) for step, v in points])

    def _log_metric_items(self, items: list) -> None:
        for i in range(0, len(items), METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[i : i + METRICS_PER_BATCH],
                                   synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow params are strings with a length cap; a long list in the spec must not
        # crash the run, so it's stringified and truncated.
        items = [Param(str(k), _truncate(str(v), MAX_PARAM_VALUE)) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_BATCH],
                                   synchronous=True)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents (checkpoints are directories)."""
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, os.fspath(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, os.fspath(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def set_tag(self, key: str, value: Any) -> None:
        self._client.set_tag(self.run_id, key, _truncate(str(value), MAX_TAG_VALUE),
                             synchronous=True)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, _truncate(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]
        self._client.log_batch(self.run_id, tags=items, synchronous=True)


class NullRunHandle(RunHandle):
    """Same interface, does nothing: tracking disabled."""

    def __init__(self) -> None:
        self._client = None
        self.run_id = None  # type: ignore[assignment]

    def log_metrics(self, metrics, step=None): pass
    def log_history(self, key, points): pass
    def log_params(self, params): pass
    def log_artifact(self, path, artifact_path=None): pass
    def log_text(self, text, artifact_file): pass
    def set_tag(self, key, value): pass
    def set_tags(self, tags): pass


class Tracker:
    """One experiment on one tracking server/store.

    ``registers_models``: whether a pipeline finished under it registers its models
    (registry.py); not a NestedTracker's, whose pipelines are a study's trials or variants.

    ``artifact_root`` (e.g. ``<workdir>/mlartifacts``) gets one folder per experiment; it's
    set explicitly because with a SQLite store MLflow would otherwise put artifacts in
    ./mlruns relative to whatever the CWD happens to be. Pass None to let a tracking
    server decide (e.g. an http:// server proxying artifacts).
    """

    registers_models = True

    def __init__(self, tracking_uri: str, experiment_name: str,
                 artifact_root: str | os.PathLike | None):
        from mlflow import MlflowClient  # imported lazily: the disabled path never needs it

        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.enabled = True
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = self._ensure_experiment(artifact_root)
        self.parent_run_id: str | None = None  # set while inside parent()
        self.last_child: dict[str, str] = {}     # child run name -> id of the latest child() of that name

    @classmethod
    def disabled(cls) -> "Tracker":
        t = cls.__new__(cls)
        t.tracking_uri = t.experiment_name = t.experiment_id = t.parent_run_id = None
        t.last_child = {}
        t.enabled = False
        t._client = None
        return t

    # Ray ships trackers to workers: the client (SQLAlchemy engine, HTTP session) isn't
    # picklable, so rebuild it from the URI on the other side.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_client"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._client = None
        if self.enabled:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)

    def _ensure_experiment(self, artifact_root: str | os.PathLike | None) -> str:
        from mlflow.exceptions import MlflowException

        location = None
        if artifact_root is not None:
            safe = re.sub(r"[^\w.-]+", "_", self.experiment_name)
            root = os.fspath(artifact_root)
            location = (f"{root.rstrip('/')}/{safe}" if "://" in root
                        else (Path(root).resolve() / safe).as_uri())
        exp = self._client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            try:
                return self._client.create_experiment(self.experiment_name,
                                                      artifact_location=location)
            except MlflowException:  # another process created it first
                exp = self._client.get_experiment_by_name(self.experiment_name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":  # a deleted name can't be re-created; revive it
            self._client.restore_experiment(exp.experiment_id)
        if location and exp.artifact_location != location:
            log.warning("experiment %r keeps its artifact location %s (not %s)",
                        self.experiment_name, exp.artifact_location, location)
        return exp.experiment_id

    def handle(self, run_id: str | None) -> RunHandle:
        """Re-attach to an existing run (e.g. inside a Ray worker) to log into it."""
        if not self.enabled or run_id is None:
            return NullRunHandle()
        return RunHandle(self._client, run_id)

    @contextlib.contextmanager
    def parent(self, run_name: str, params: dict[str, Any], tags: dict[str, Any] | None = None,
               run_id: str | None = None) -> Iterator[RunHandle]:
        """Start the job's run, or resume ``run_id`` (a rerun after a crash)."""
        if not self.enabled:
            yield NullRunHandle()
            return
        tags = {k: _truncate(str(v), MAX_TAG_VALUE) for k, v in (tags or {}).items()}
        if run_id is None:
            run = self._client.create_run(self.experiment_id, tags=tags, run_name=run_name)
            handle = RunHandle(self._client, run.info.run_id)
            handle.log_params(params)
        else:
            handle = RunHandle(self._client, run_id)
            self._client.update_run(run_id, status="RUNNING")
            if "error" in self._client.get_run(run_id).data.tags:  # left by the interruption
                self._client.delete_tag(run_id, "error")
            for k, v in tags.items():
                handle.set_tag(k, v)
            handle.log_params(self._new_params(run_id, params))
        previous, self.parent_run_id = self.parent_run_id, handle.run_id
        try:
            with self._terminate(handle):
                yield handle
        finally:
            self.parent_run_id = previous

    def _new_params(self, run_id: str, params: dict[str, Any]) -> dict[str, Any]:
        # MLflow params are immutable: re-logging a different value is an error. On resume
        # log only new keys, and warn about changed ones rather than failing the job.
        existing = self._client.get_run(run_id).data.params
        new = {}
        for k, v in params.items():
            v = _truncate(str(v), MAX_PARAM_VALUE)
            if str(k) not in existing:
                new[k] = v
            elif existing[str(k)] != v:
                log.warning("run %s: param %r was %r, now %r (kept the old value)",
                            run_id, k, existing[str(k)], v)
        return new

    @contextlib.contextmanager
    def child(self, stage_name: str, params: dict[str, Any] | None = None,
              parent_run_id: str | None = None) -> Iterator[RunHandle]:
        """A nested run under the current parent (or an explicit ``parent_run_id``)."""
        if not self.enabled:
            yield NullRunHandle()
            return
        pid = parent_run_id or self.parent_run_id
        if pid is None:
            raise RuntimeError("Tracker.child() needs an active parent() or a parent_run_id")
        run = self._client.create_run(
            self.experiment_id, run_name=stage_name,
            tags={"mlflow.parentRunId": pid, "stage": stage_name})
        handle = RunHandle(self._client, run.info.run_id)
        self.last_child[stage_name] = handle.run_id
        if params:
            handle.log_params(params)
        with self._terminate(handle):
            yield handle

    def tag_outputs(self, stage: str, outputs: dict[str, dict[str, str]]) -> None:
        """Tag the latest child run of `stage` with each output's sha256 (a manifest's
        `outputs`), as OUTPUT_TAG. Done for reused stages too: they name the bytes they used."""
        if self.enabled and stage in self.last_child:
            self.handle(self.last_child[stage]).set_tags({OUTPUT_TAG.format(name): o["sha256"]
                                                          for name, o in outputs.items()})

    @contextlib.contextmanager
    def _terminate(self, handle: RunHandle) -> Iterator[None]:
        """FINISHED on success; FAILED (KILLED for Ctrl-C, or SystemExit: how Ray ends a task
        that Tune stops) with an ``error`` tag and the traceback as an artifact on exception,
        which then propagates unchanged."""
        try:
            yield
        except BaseException as e:
            status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
            try:  # never let a tracking failure mask the real error
                handle.set_tag("error", f"{type(e).__name__}: {e}")
                handle.log_text(traceback.format_exc(), "error.txt")
                self._client.set_terminated(handle.run_id, status=status)
            except Exception as track_err:
                log.warning("could not mark run %s %s: %s", handle.run_id, status, track_err)
            raise
        self._client.set_terminated(handle.run_id, status="FINISHED")


class NestedTracker(Tracker):
    """The same experiment, with each pipeline's parent run placed under an outer run: how a
    study nests its pipelines in MLflow.

    `adopt=False` (ablate): every `parent()` opens a new run nested under the outer one, so each
    variant's pipeline run, with its stage runs, sits under the ablation's run; `last_run_id`
    names the latest, to log the variant's scores into it.
    `adopt=True` (a sweep trial): the outer run *is* the pipeline's parent, so the stage runs
    nest directly under the trial, which stays one run from its first stage to its final scores.
    Neither registers its models: the sweep's best.yaml is a job whose `run` does.
    """

    registers_models = False

    def __init__(self, base: Tracker, outer_run_id: str, tags: dict | None = None, adopt: bool = False):
        super().__init__(base.tracking_uri, base.experiment_name, None)  # the experiment exists already
        self.outer_run_id, self.extra_tags, self.adopt = outer_run_id, dict(tags or {}), adopt
        self.last_run_id: str | None = outer_run_id if adopt else None
        if adopt:
            self.parent_run_id = outer_run_id

    @contextlib.contextmanager
    def parent(self, run_name, params, tags=None, run_id=None):
        if self.adopt:
            yield self.handle(self.outer_run_id)  # its status is the outer run's own
            return
        tags = {**(tags or {}), **self.extra_tags, "mlflow.parentRunId": self.outer_run_id}
        with super().parent(run_name, params, tags, run_id) as handle:
            self.last_run_id = handle.run_id
            yield handle

    def copy_metric_history(self, from_run_id: str | None, key: str) -> None:
        """Log another run's metric history (e.g. the student stage's valid BLEU) on the outer
        run too, where the MLflow UI compares it across trials."""
        if from_run_id:
            history = self._client.get_metric_history(from_run_id, key)
            self.handle(self.outer_run_id).log_history(key, [(m.step, m.value) for m in history])


def make_tracker(spec: JobSpec) -> Tracker:
    uri = resolve_tracking_uri(spec.tracking.uri, spec.workdir)
    root = default_artifact_root(spec.workdir) if uri.startswith("sqlite:") or "://" not in uri else None
    return Tracker(uri, spec.tracking.experiment or spec.name, root)
