"""Measurements on a finished run directory, for `imitate-orch report` and `ablate`.

- `find_job_run`: the job spec of a run dir, from the `job.yaml` its MLflow parent run holds.
- `training_curves`: `train/loss` and `valid/bleu` by step, from the MLflow run that trained
  the stage (found by the stage manifest's start/finish times; linked stages included).
- `delta_t_sweep`: BLEU and batch-1 latency of NAT+LPD for ΔT = 0..max (plus AT and NAT).
- `action_usage`: how often each action is the argmax of π (eq 3) in the teacher, teacher-forced
  on a split: the histogram of the paper's Figure 4.
Results that cost decoding are cached in JSON files keyed by model checksums and settings.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from imitate_nat.imitation import usage_entropy

from ..run.files import atomic_write_json
from ..run.layout import MODEL, SPM
from ..run.manifest import read_manifest
from ..run.tracking import store_client
from ..spec.loading import spec_from_dict
from ..spec.schema import JobSpec

log = logging.getLogger("imitate_orch")


def cached(path: Path, key: dict, compute: Callable[[], dict]) -> dict:
    """compute(), or the value stored in `path` under the same key (written atomically)."""
    try:
        stored = json.loads(Path(path).read_text())
        if stored.get("key") == key:
            return stored["value"]
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    value = compute()
    atomic_write_json(path, {"key": key, "value": value})
    return value


def output_sha(rd: Path, stage: str, name: str) -> str:
    """The sha256 the stage's manifest recorded for its output `name`."""
    return read_manifest(rd / stage).outputs[name]["sha256"]


def decoding_key(rd: Path, split: str) -> dict:
    """What decoding `split` of run `rd` reads, by sha256: both models, the tokenizer and the
    split's source and reference. The models alone are not enough: a new test set or tokenizer
    can leave a deterministic training's model bytes unchanged, and the cached scores stale."""
    return {"teacher": output_sha(rd, "teacher", MODEL), "student": output_sha(rd, "student", MODEL),
            "tokenizer": output_sha(rd, "tokenizer", SPM), "split": split,
            "src": output_sha(rd, "prepare", f"{split}.src"), "ref": output_sha(rd, "prepare", f"{split}.tgt")}


# ------------------------------------------------------------------------------ decoding --

def delta_t_sweep(rd: Path, spec: JobSpec, split: str, max_delta_t: int, device: str, cache: Path,
                  progress: bool = True) -> dict:
    """{"delta_t": [0..max], "bleu": [...], "latency_ms": [...], "at": {...}, "nat": {...}}:
    NAT+LPD at each ΔT on `split`, beside the AT (beam) and the one-pass NAT."""
    from tqdm import tqdm

    from ..decoding import decoders, latencies_ms, load_run_models, read_split, translate_and_score

    e = spec.eval
    key = {**decoding_key(rd, split), "max_delta_t": max_delta_t, "eval": e.model_dump(mode="json"),
           "latency": "side by side"}

    def compute() -> dict:
        tok, at, nat = load_run_models(rd, device)
        src, ref = read_split(rd, split)
        cap = at.cfg.max_positions
        out = {"split": split, "sentences": len(src), "device": device, "delta_t": list(range(max_delta_t + 1)),
               "bleu": []}
        fixed = decoders(at, nat, e.beam_size, 0, e.length_penalty)
        timed = {"at": fixed["at"][0], "nat": fixed["nat"][0]}
        for name in ("at", "nat"):
            out[name] = translate_and_score(fixed[name], tok, src, ref, e.batch_tokens, device, cap, e.bleu_tokenize)[0]
        for d in tqdm(out["delta_t"], desc=f"LPD ΔT sweep on {split}", disable=not progress):
            lpd = decoders(at, nat, e.beam_size, d, e.length_penalty)["lpd"]
            timed[d] = lpd[0]
            row = translate_and_score(lpd, tok, src, ref, e.batch_tokens, device, cap, e.bleu_tokenize)[0]
            out["bleu"].append(row["bleu"])
        lat = latencies_ms(src, tok, timed, device, e.latency_sentences, progress=progress)
        for name in ("at", "nat"):
            out[name]["latency_ms"] = lat[name]
        out["latency_ms"] = [lat[d] for d in out["delta_t"]]
        return out

    return cached(cache, key, compute)


# -------------------------------------------------------------------------- action usage --

def teacher_forced_batches(tok, src: list[str], ref: list[str], max_positions: int, device: str,
                           batch_tokens: int = 4096):
    """Batches of the non-empty (src, ref) pairs, tokenized and cut to the models' positions,
    for teacher-forced measurements. Raises ValueError when there are none."""
    from imitate_nat.data import make_batch, token_batches

    cap = max_positions - 1  # room for EOS (source) and BOS (target input)
    pairs = [(s[:cap], t[:cap]) for s, t in zip(tok.encode_batch(src), tok.encode_batch(ref)) if s and t]
    if not pairs:
        raise ValueError("no non-empty sentence pairs to measure on")
    return [make_batch([pairs[i][0] for i in idx], [pairs[i][1] for i in idx]).to(device)
            for idx in token_batches([max(len(s), len(t)) + 1 for s, t in pairs], batch_tokens)]


def action_usage(at, tok, src: list[str], ref: list[str], device: str, batch_tokens: int = 4096) -> dict:
    """Argmax-action histogram (eq 3) of an AT teacher, teacher-forced on (src, ref), over every
    real target position (incl. the EOS step, as the regularizer sees them) and decoder layer."""
    n, layers = at.cfg.n_actions, at.cfg.dec_layers
    counts = torch.zeros(layers, n, dtype=torch.long)
    for b in teacher_forced_batches(tok, src, ref, at.cfg.max_positions, device, batch_tokens):
        _, log_pis = at(b.src, b.tgt_in)
        keep = b.tgt_out.ne(at.cfg.pad_id)
        for l, log_pi in enumerate(log_pis):
            counts[l] += torch.bincount(log_pi.argmax(-1)[keep].cpu(), minlength=n)
    total = counts.sum(0)
    return {"n_actions": n, "positions": int(counts[0].sum()), "counts": total.tolist(),
            "used": int((total > 0).sum()), "entropy": usage_entropy(total),
            "per_layer_entropy": [usage_entropy(c) for c in counts], "max_entropy": math.log(n)}


def teacher_action_usage(model_path: Path, spm_path: Path, src, ref, device: str, batch_tokens: int, cache: Path) -> dict:
    from imitate_nat.checkpoint import load_model
    from imitate_nat.tokenizer import Tokenizer

    from ..run.files import sha256_file

    key = {"model": sha256_file(model_path), "spm": sha256_file(spm_path), "sentences": len(src),
           "data": sum(len(s) + len(r) for s, r in zip(src, ref))}

    def compute() -> dict:
        tok = Tokenizer(spm_path)
        at, _ = load_model(model_path, device)
        if at.cfg.vocab_size != tok.vocab_size:
            raise ValueError(f"{model_path} has a vocabulary of {at.cfg.vocab_size}, the tokenizer "
                             f"{spm_path} {tok.vocab_size}: give the teacher's run dir instead")
        return action_usage(at, tok, src, ref, device, batch_tokens)

    return cached(cache, key, compute)


# ------------------------------------------------------------------------------- MLflow --

@dataclass
class JobRun:
    spec: JobSpec
    run_id: str | None      # the MLflow parent run of the job (None: spec given by file, no run found)
    matches: bool           # the spec's evaluate hash equals the run dir's (it produced this run)


def _experiment_ids(client) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _job_yaml(client, run_id: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        return yaml.safe_load(Path(client.download_artifacts(run_id, "job.yaml", d)).read_text())


def find_job_run(rd: Path, uri: str, spec: JobSpec | None = None) -> JobRun | None:
    """The MLflow parent run (tagged job=<run dir name>) whose job.yaml produced `rd` (same
    evaluate-stage hash), preferring one whose workdir is rd's parent. With `spec` given, only
    its run is looked for. None when no run matches."""
    from ..run.hashing import stage_hashes

    want = read_manifest(rd / "evaluate").input_hash
    client = store_client(uri)
    if client is None:
        return None
    name = spec.name if spec else rd.name
    runs = client.search_runs(_experiment_ids(client), filter_string=f"tags.job = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=100)
    best = None
    for run in runs:
        try:
            candidate = spec or spec_from_dict(_job_yaml(client, run.info.run_id))
        except Exception as e:  # artifact gone or unreadable, or a spec that no longer validates (SpecError)
            log.warning("MLflow run %s of job %s: no usable job.yaml (%s)", run.info.run_id, name, e)
            continue
        if stage_hashes(candidate)["evaluate"] != want:
            continue
        same_dir = Path(run.data.params.get("workdir", "")).resolve() / name == rd
        if same_dir:
            return JobRun(candidate, run.info.run_id, True)
        best = best or JobRun(candidate, run.info.run_id, True)
    return best


def _iso_ms(stamp: str) -> int:
    return int(dt.datetime.fromisoformat(stamp).timestamp() * 1000)


def training_curves(rd: Path, uri: str, metrics=("train/loss", "valid/bleu"), stages=("teacher", "student")) -> dict:
    """{stage: {"run_id": ..., metric: [[step, value], ...]}} for the training `stages`, from the
    MLflow run that trained the stage dir's current model (start time inside the manifest's
    started..finished window; with several, the one whose job's run dir holds the stage)."""
    client = store_client(uri)
    out = {}
    for stage in stages if client else ():
        m = read_manifest(rd / stage)
        lo, hi = _iso_ms(m.started), _iso_ms(m.finished) + 2000  # manifest times are whole seconds
        runs = client.search_runs(
            _experiment_ids(client), order_by=["attributes.start_time DESC"],
            filter_string=f"tags.stage = '{stage}' and params.reused = 'False' and "
                          f"attributes.start_time >= {lo} and attributes.start_time <= {hi}")
        if not runs:
            continue
        run = next((r for r in runs if _stage_dir_of(client, r, stage) == (rd / stage).resolve()), runs[0])
        curves = {"run_id": run.info.run_id}
        for key in metrics:
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda x: x.step)
            curves[key] = [[h.step, h.value] for h in history]
        out[stage] = curves
    return out


def _stage_dir_of(client, run, stage: str) -> Path | None:
    parent = run.data.tags.get("mlflow.parentRunId")
    if not parent:
        return None
    params = client.get_run(parent).data.params
    if "workdir" not in params or "name" not in params:
        return None
    return (Path(params["workdir"]).resolve() / params["name"] / stage).resolve()
