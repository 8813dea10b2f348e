"""The MLflow model registry: a finished run's models as one `mlflow.pyfunc` model, registered
under the job's name, and `models:/NAME/VERSION` or `models:/NAME@ALIAS` URIs resolved back to
files that `serve`, `eval` and `translate --run` load.

The logged model (orchestrator/pyfunc_model.py) holds the tokenizer and both models in a run
directory's layout under `artifacts/` (tokenizer/spm.model, teacher/model.pt, student/model.pt),
so a downloaded model loads with decoding.load_run_models like a run directory; the job's eval
settings as its model_config; and each file's sha256 in its metadata, checked after every
download (as `serve RUN_ID` checks the files of stage runs).

No code is shipped with the model (no code_paths): the decoders are imitate_nat's and
orchestrator's, and the environment that loads the model needs imitate-orch installed anyway
(torch, sentencepiece at the versions it pins). A copy of the code inside the model would be a
second version of the decoders to keep in step. The pip requirement logged is
`imitate-orch==<version>`.

Like run/tracking.py, everything goes through an MlflowClient bound to one URI (the registry is
the tracking store's), never the fluent API's process-wide state. Called by pipeline.py (logging,
registering) and serve/target.py (resolving); it sits above run/ because the model it logs
decodes with decoding.py.
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .run.files import sha256_file
from .run.layout import MODEL_FILES
from .run.manifest import package_version, read_manifest

log = logging.getLogger("imitate_orch")

MODEL_ARTIFACT = "model"        # the pyfunc model's folder in the parent run's artifacts
MODEL_FILES_DIR = "artifacts"   # inside a pyfunc model: the run-dir layout of MODEL_FILES
# The eval settings the model decodes with (its model_config), and what `serve`/`eval` take as defaults.
EVAL_SETTINGS = ("beam_size", "delta_t", "length_penalty", "batch_tokens", "bleu_tokenize", "cpu_fast")
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")
INPUT_EXAMPLE = ["a happy bird sees the horse", "the dog runs"]


class RegistryError(Exception):
    """A models:/ URI that names no model version (or a registry that cannot be read)."""


def is_model_uri(text: str) -> bool:
    return text.startswith("models:/")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME/VERSION or models:/NAME@ALIAS -> (name, version, alias)."""
    m = MODEL_URI.match(uri)
    if not m:
        raise RegistryError(f"{uri}: not models:/NAME/VERSION or models:/NAME@ALIAS")
    return m["name"], m["version"], m["alias"]


# ------------------------------------------------------------------------ logging a run's model --

def has_model_files(rd: Path) -> bool:
    """Whether run `rd`'s manifests record every model file (pipelines of fake stages do not)."""
    manifests = {stage: read_manifest(rd / stage) for stage in MODEL_FILES}
    return all(m is not None and MODEL_FILES[stage] in m.outputs for stage, m in manifests.items())


def model_digests(rd: Path) -> dict[str, str]:
    """stage -> sha256 of its model file, as the stage's manifest recorded it."""
    return {stage: read_manifest(rd / stage).outputs[name]["sha256"] for stage, name in MODEL_FILES.items()}


def save_pyfunc_model(rd: Path, eval_settings: dict, job: str, dst: Path) -> Path:
    """Write run `rd`'s models as a pyfunc model folder `dst` (see module doc)."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from .pyfunc_model import TranslationModel

    staged = dst.parent / "staged"   # one folder per stage, so the model keeps the run-dir layout
    for stage, name in MODEL_FILES.items():
        (staged / stage).mkdir(parents=True)
        shutil.copy2(rd / stage / name, staged / stage / name)
    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]))
    mlflow.pyfunc.save_model(
        str(dst), python_model=TranslationModel(),
        artifacts={stage: str(staged / stage) for stage in MODEL_FILES},
        model_config={"job": job, **{k: eval_settings[k] for k in EVAL_SETTINGS}},
        signature=signature, input_example={"text": INPUT_EXAMPLE},
        # Given, not inferred: inferring loads the model in a subprocess (seconds per run).
        pip_requirements=[f"imitate-orch=={package_version()}"],
        metadata={"sha256": model_digests(rd)})
    return dst


def same_models_version(client, name: str, digests: dict[str, str]):
    """The newest registered version of `name` holding exactly these model files, or None."""
    tags = {f"sha256.{stage}": d for stage, d in digests.items()}
    versions = client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"])
    return next((v for v in versions if all(v.tags.get(k) == d for k, d in tags.items())), None)


def register_run_models(tracker, parent, rd: Path, spec) -> str | None:
    """At the end of a pipeline run: log run `rd`'s models on its MLflow run `parent` (a
    run/tracking.py RunHandle) as one pyfunc model and register it under the job's name; the
    version ("NAME/VERSION") is tagged on `parent`. Nothing for a disabled tracker, a tracker
    of study pipelines (sweep trials, ablation variants: studies, not models to ship) or a run
    without model files (fake stages). A registry that refuses (e.g. a server without one)
    costs a warning, not the finished run."""
    if not (tracker.enabled and tracker.registers_models and has_model_files(rd)):
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracker.tracking_uri, registry_uri=tracker.tracking_uri)
    try:
        registered = log_and_register(client, parent.run_id, rd, spec.eval.model_dump(), spec.name)
    except (MlflowException, OSError) as e:
        log.warning("the run's models were not registered in %s: %s", tracker.tracking_uri, e)
        parent.set_tag("registry_error", e)
        return None
    parent.set_tag("registered_model", registered)
    return registered


def log_and_register(client, run_id: str, rd: Path, eval_settings: dict, name: str) -> str:
    """Log run `rd`'s pyfunc model on MLflow run `run_id` and register it as a version of `name`.
    A run whose three model files are a registered version's already (every stage reused)
    registers nothing new. Returns "NAME/VERSION"."""
    from mlflow.exceptions import MlflowException

    digests = model_digests(rd)

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = same_models_version(client, name, digests)
    if existing is not None:
        log.info("registered model %s version %s holds these models already", name, existing.version)
        return f"{name}/{existing.version}"
    with tempfile.TemporaryDirectory() as tmp:
        save_pyfunc_model(rd, eval_settings, name, Path(tmp) / MODEL_ARTIFACT)
        client.log_artifacts(run_id, str(Path(tmp) / MODEL_ARTIFACT), MODEL_ARTIFACT)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    version = client.create_model_version(name, source, run_id=run_id,
                                          tags={f"sha256.{stage}": d for stage, d in digests.items()})
    log.info("registered %s as model %s version %s", rd, name, version.version)
    return f"{name}/{version.version}"


# ------------------------------------------------------------------- resolving a models:/ URI --

@dataclass(frozen=True)
class RegisteredModel:
    """One model version, pinned: `uri` names its number even when an alias was asked for, so
    every replica loads the same version though the alias moves meanwhile."""

    name: str
    version: str
    run_id: str | None
    uri: str
    settings: dict                  # model_config: job, EVAL_SETTINGS
    digests: dict[str, str]         # stage -> sha256 of its model file


def model_version(client, uri: str):
    """The ModelVersion a models:/ URI names, or RegistryError saying which part is unknown."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"{uri}: no registered model named '{name}'") from None
    try:
        return client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except MlflowException:
        what = f"version {version}" if version else f"alias '{alias}'"
        raise RegistryError(f"{uri}: registered model '{name}' has no {what}") from None


def resolve_model(client, uri: str) -> RegisteredModel:
    """What a models:/ URI names in the registry of `client` (run/tracking.py store_client), with
    its settings and digests (read from its MLmodel file, not downloading the models)."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.pyfunc import MODEL_CONFIG

    mv = model_version(client, uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mlmodel = download(client, mv, tmp, "MLmodel")
        except (MlflowException, OSError) as e:
            raise RegistryError(f"{uri}: the files of version {mv.version} cannot be read: {e}") from None
        meta = Model.load(str(mlmodel))
    # MLflow files save_model's model_config under the flavor's "config" key (pyfunc.MODEL_CONFIG).
    settings = meta.flavors["python_function"].get(MODEL_CONFIG) or {}
    return RegisteredModel(mv.name, str(mv.version), mv.run_id, f"models:/{mv.name}/{mv.version}",
                           settings, (meta.metadata or {}).get("sha256", {}))


def download(client, mv, dst: str, path: str = "") -> Path:
    """A file (or, for "", the whole model) of model version `mv` into `dst`."""
    from mlflow.artifacts import download_artifacts

    source = client.get_model_version_download_uri(mv.name, mv.version).rstrip("/")
    return Path(download_artifacts(artifact_uri=f"{source}/{path}" if path else source, dst_path=dst))


def download_model_files(client, model: RegisteredModel, dst: str) -> Path:
    """Download `model` into `dst`; returns the folder in run-dir layout (load_run_models reads
    it), each file checked against the sha256 logged with it."""
    mv = model_version(client, model.uri)
    files = download(client, mv, dst) / MODEL_FILES_DIR
    for stage, name in MODEL_FILES.items():
        if sha256_file(files / stage / name) != model.digests.get(stage):
            raise RegistryError(f"{model.uri}: {stage}/{name} is not the file logged with the model (sha256 differs)")
    return files
