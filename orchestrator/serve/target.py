"""`imitate-orch serve`: find a finished run's models, deploy the Serve app, run until Ctrl-C.

A model source is one of
- a run directory (<workdir>/<job>) whose tokenizer, teacher and student stages are done;
- a job YAML: its run directory (pipeline.run_dir(spec));
- an MLflow run id: a pipeline's parent run; each replica downloads spm.model and the two
  model.pt files from the stage runs that logged them. A stage reused from an earlier run
  logs no artifact, so its file comes from a run that ran that stage and logged the same
  bytes: every stage run is tagged with the sha256 of its outputs (run/tracking.py
  OUTPUT_TAG), and a replica checks each download against it;
- a registered model, models:/NAME/VERSION or models:/NAME@ALIAS (registry.py): resolved
  once to its version number, which each replica downloads and checks against the sha256 of
  each file logged with it. Its eval settings (the model's model_config) are the defaults.

What is loaded must belong together: for a run directory, each model file must still hash to
what its stage's manifest recorded, and the teacher and the student must have been trained on
the tokenizer (and teacher) outputs there now (the manifests' `consumed` digests); else
ServeSetupError names the stage.

The job's spec gives the serve and eval sections (limits, replicas, GPUs, ΔT, beam settings):
the job YAML itself, or the job.yaml logged on the MLflow parent run (for a run directory:
the newest finished parent run of that job in the tracking store, if any; else defaults).
Where to listen (serve.host) and which cluster to join (ray.address) come only from a local
job YAML or the flags, never from a stored job.yaml. CLI flags become `serve.*` /
`eval.delta_t` overrides, validated like `--set`.
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..run.files import sha256_file
from ..run.hashing import consumed_digests
from ..run.layout import MODEL_FILES, check_finished
from ..run.manifest import read_manifest
from ..registry import RegisteredModel, RegistryError, download_model_files, is_model_uri, resolve_model
from ..run.tracking import OUTPUT_TAG, resolve_tracking_uri, store_client
from ..spec.loading import SpecError, apply_overrides, spec_from_dict
from ..spec.schema import JobSpec, default_workdir

log = logging.getLogger("imitate_orch")

# Sections of a stored job.yaml that serving reads; the others (e.g. data.dir, which must
# exist to validate) belong to training and may not hold on the serving machine.
SERVE_SECTIONS = ("name", "eval", "serve", "ray")
# Settings of a stored job.yaml that are not taken: anyone who can write to the tracking store
# could otherwise make `serve <run id>` listen on every interface or join another cluster.
LOCAL_ONLY = {"serve": ("host",), "ray": ("address",)}
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ServeSetupError(Exception):
    """The model source cannot be served (missing files, unfinished run, unknown run id)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a replica finds its models: a run directory, or MLflow stage runs."""

    job: str
    run_id: str | None = None              # MLflow parent run (None if not tracked/found)
    run_dir: str | None = None
    tracking_uri: str | None = None
    stage_runs: dict[str, str] = field(default_factory=dict)  # MLflow: stage -> run holding its file
    digests: dict[str, str] = field(default_factory=dict)     # MLflow: stage -> sha256 of its file
    model: RegisteredModel | None = None                      # a registered model version

    def describe(self) -> dict:
        """What /health and every response say about the model: the kind of source, not its
        path (a server's directories are none of its clients' business)."""
        kind = "run_dir" if self.run_dir else "registry" if self.model else "mlflow"
        return {"job": self.job, "run_id": self.run_id, "source": kind}

    def location(self) -> str:
        """Where the models are, for the operator's log."""
        if self.model:
            return f"{self.model.uri} ({self.tracking_uri})"
        return self.run_dir or f"MLflow run {self.run_id} ({self.tracking_uri})"


@dataclass(frozen=True)
class ServeTarget:
    source: ModelSource
    spec: JobSpec


def flag_overrides(host=None, port=None, replicas=None, delta_t=None, max_batch_size=None, cpu_fast=None) -> list[str]:
    """CLI flags as `--set` overrides (so they are validated and reported like the spec)."""
    pairs = (("serve.host", host), ("serve.port", port), ("serve.replicas", replicas),
             ("eval.delta_t", delta_t), ("serve.max_batch_size", max_batch_size), ("eval.cpu_fast", cpu_fast))
    return [f"{k}={v}" for k, v in pairs if v is not None]


def latest_parent_run(uri: str, job: str):
    """The newest finished pipeline (parent) run of `job`, or None."""
    client = store_client(uri)
    if client is None:
        return None
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids, f"tags.job = '{job}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1) if exp_ids else []
    return runs[0] if runs else None


def _stored_spec(client, run) -> dict:
    """The serving sections of the job.yaml logged on a parent run ({} when absent), less
    LOCAL_ONLY."""
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    if "job.yaml" not in names:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        raw = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "job.yaml", tmp)).read_text()) or {}
    out, ignored = {k: v for k, v in raw.items() if k in SERVE_SECTIONS}, []
    for section, keys in LOCAL_ONLY.items():
        if isinstance(out.get(section), dict):
            default = JobSpec.model_fields[section].default_factory()
            # A stored job.yaml holds every field: name only those that would have mattered.
            ignored += [f"{section}.{k}={out[section][k]}" for k in keys
                        if out[section].get(k, getattr(default, k)) != getattr(default, k)]
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    if ignored:
        log.info("ignoring %s of the job.yaml stored on MLflow run %s (local settings only: --host, --address)",
                 ", ".join(ignored), run.info.run_id)
    return out


def check_models_belong_together(rd: Path) -> None:
    """ServeSetupError unless each model file of run dir `rd` hashes to what its manifest
    recorded and each later stage ran on the outputs its earlier stages hold now: a teacher
    retrained after the student (`run --force teacher --until teacher`), or a model.pt copied
    in, would otherwise be served beside a student that never imitated it."""
    for stage, name in MODEL_FILES.items():
        recorded = read_manifest(rd / stage).outputs[name]
        if sha256_file(rd / stage / recorded["path"]) != recorded["sha256"]:
            raise ServeSetupError(f"{rd}: {stage}/{recorded['path']} changed since the '{stage}' stage wrote it "
                                  f"(its sha256 differs from the manifest's). Run `imitate-orch run JOB` to redo it.")
    stages = list(MODEL_FILES)
    for i, later in enumerate(stages[1:], 1):
        # Manifests from before `consumed` was recorded have none: nothing to compare.
        consumed, now = read_manifest(rd / later).consumed, consumed_digests(rd, later)
        for earlier in stages[:i]:
            if earlier in consumed and consumed[earlier] != now.get(earlier):
                raise ServeSetupError(f"{rd}: the '{later}' stage ran on other '{earlier}' outputs than those in "
                                      f"{earlier}/ now (redone since). Run `imitate-orch run JOB` to bring "
                                      f"'{later}' up to date.")


def _digest(run, name: str) -> str:
    digest = run.data.tags.get(OUTPUT_TAG.format(name))
    if not digest:
        raise ServeSetupError(f"MLflow run {run.info.run_id} ({run.data.tags.get('stage')}) has no "
                              f"{OUTPUT_TAG.format(name)} tag (logged before they were): serve its run directory")
    return digest


def stage_runs(client, parent) -> tuple[dict[str, str], dict[str, str]]:
    """(stage -> the run that logged its file, stage -> the file's sha256) for the pipeline run
    `parent`: the sha256 its own stage run recorded, and a finished run that ran the stage
    (not reused) and logged those bytes, by its OUTPUT_TAG (see module doc)."""
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                         f"attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
    runs, digests = {}, {}
    for stage, name in MODEL_FILES.items():
        # The newest: a resumed parent run can hold a stage twice, and later stages read the last.
        own = next((r for r in children if r.data.tags.get("stage") == stage), None)
        if own is None:
            raise ServeSetupError(f"MLflow run {parent.info.run_id}: no finished '{stage}' stage run")
        digests[stage] = _digest(own, name)
        producers = client.search_runs(
            [exp], f"tags.stage = '{stage}' and tags.`{OUTPUT_TAG.format(name)}` = '{digests[stage]}' and "
                   f"params.reused = 'False' and attributes.status = 'FINISHED'")
        runs[stage] = next((r.info.run_id for r in producers
                            if name in {a.path for a in client.list_artifacts(r.info.run_id)}), None)
        if runs[stage] is None:
            raise ServeSetupError(f"MLflow run {parent.info.run_id}: no run logged {stage}/{name} with the sha256 "
                                  f"its '{stage}' stage used ({digests[stage][:12]}...)")
    return runs, digests


def resolve_target(arg: str, overrides: Sequence[str] = (), tracking_uri: str | None = None,
                   spec: JobSpec | None = None) -> ServeTarget:
    """RUN_DIR | JOB.yaml (pass its validated `spec`) | MLflow run id | models:/ URI -> what to
    serve, how. Raises RunNotReady, ServeSetupError or SpecError (all: exit 2 in the CLI) before
    anything starts."""
    if spec is None and is_model_uri(arg):
        target = _from_registry(arg, overrides, tracking_uri)
    elif spec is not None or Path(arg).is_file():
        target = _from_job(arg, overrides, tracking_uri, spec)
    elif Path(arg).is_dir():
        target = _from_run_dir(Path(arg).resolve(), overrides, tracking_uri)
    elif RUN_ID.match(arg):
        target = _from_mlflow(arg, overrides, tracking_uri)
    else:
        raise ServeSetupError(f"{arg}: not a run directory, a job YAML, an MLflow run id or a models:/ URI")
    e, s = target.spec.eval, target.spec.serve
    if e.delta_t > s.max_delta_t:
        raise SpecError([("eval.delta_t", f"default ΔT {e.delta_t} exceeds serve.max_delta_t {s.max_delta_t}")], arg)
    return target


def _from_job(path: str, overrides, tracking_uri, spec: JobSpec | None) -> ServeTarget:
    from ..run.layout import run_dir
    from ..spec.loading import load_spec

    spec = spec or load_spec(path, list(overrides))
    rd = run_dir(spec)
    check_finished(rd, MODEL_FILES)
    check_models_belong_together(rd)
    uri = tracking_uri or resolve_tracking_uri(spec.tracking.uri, spec.workdir)
    run = latest_parent_run(uri, spec.name)
    return ServeTarget(ModelSource(spec.name, run.info.run_id if run else None, str(rd), uri), spec)


def _from_run_dir(rd: Path, overrides, tracking_uri) -> ServeTarget:
    check_finished(rd, MODEL_FILES)
    check_models_belong_together(rd)
    uri = tracking_uri or resolve_tracking_uri(None, rd.parent)  # the default store of its workdir
    run = latest_parent_run(uri, rd.name)
    if not run:
        log.info("no MLflow run of job '%s' in %s: serve/eval settings are the defaults", rd.name, uri)
    raw = _stored_spec(store_client(uri), run) if run else {}
    spec = spec_from_dict(apply_overrides({**raw, "name": rd.name}, list(overrides)), f"{rd} (stored job.yaml)")
    return ServeTarget(ModelSource(rd.name, run.info.run_id if run else None, str(rd), uri), spec)


def _from_mlflow(run_id: str, overrides, tracking_uri) -> ServeTarget:
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or resolve_tracking_uri(None, default_workdir())
    client = store_client(uri)
    if client is None:
        raise ServeSetupError(f"MLflow store {uri} not found (set --tracking-uri or MLFLOW_TRACKING_URI)")
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ServeSetupError(f"MLflow run {run_id} not found in {uri}: {e.message}") from None
    job = run.data.tags.get("job")
    if not job:
        raise ServeSetupError(f"MLflow run {run_id} is not a pipeline (parent) run: it has no 'job' tag")
    raw = {**_stored_spec(client, run), "name": job}
    spec = spec_from_dict(apply_overrides(raw, list(overrides)), f"mlflow:{run_id} job.yaml")
    runs, digests = stage_runs(client, run)
    return ServeTarget(ModelSource(job, run_id, None, uri, runs, digests), spec)


def _from_registry(uri: str, overrides, tracking_uri) -> ServeTarget:
    store = tracking_uri or resolve_tracking_uri(None, default_workdir())
    client = store_client(store)
    if client is None:
        raise ServeSetupError(f"{uri}: MLflow store {store} not found, no model registry to look in "
                              f"(set MLFLOW_TRACKING_URI, or --tracking-uri for serve)")
    try:
        model = resolve_model(client, uri)
    except RegistryError as e:
        raise ServeSetupError(str(e)) from None
    settings = {k: v for k, v in model.settings.items() if k != "job"}
    raw = {"name": model.settings.get("job", model.name), "eval": settings}
    spec = spec_from_dict(apply_overrides(raw, list(overrides)), f"{uri} (its model_config)")
    return ServeTarget(ModelSource(spec.name, model.run_id, None, store, model=model), spec)


def load_models(source: ModelSource, device: str):
    """(tokenizer, AT, NAT) for a replica, from the run directory or downloaded from MLflow."""
    from ..decoding import load_run_models

    if source.run_dir:
        return load_run_models(Path(source.run_dir), device)
    tmp = Path(tempfile.mkdtemp(prefix="imitate-serve-"))
    try:
        client = store_client(source.tracking_uri)
        if client is None:
            raise ServeSetupError(f"MLflow store {source.tracking_uri} is gone")
        if source.model:
            try:
                return load_run_models(download_model_files(client, source.model, str(tmp)), device)
            except RegistryError as e:
                raise ServeSetupError(str(e)) from None
        for stage, name in MODEL_FILES.items():
            (tmp / stage).mkdir()
            path = client.download_artifacts(source.stage_runs[stage], name, str(tmp / stage))
            if sha256_file(path) != source.digests[stage]:  # an artifact replaced in the store
                raise ServeSetupError(f"MLflow run {source.stage_runs[stage]}: {stage}/{name} is not the file "
                                      f"its {OUTPUT_TAG.format(name)} tag names")
        return load_run_models(tmp, device)  # everything is in memory afterwards
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


