"""What a stage's identity is, and what changed since it ran.

A stage's input hash covers the spec sections it reads (run/layout.py's stage table), the
job's seed and the hash of the stage before it, so a change anywhere upstream invalidates
everything downstream. Beside it, a manifest records the sha256 of the outputs each earlier
stage had when this one ran ("consumed"): a stage redone with different bytes makes the later
ones stale even when no setting changed. A training stage whose only change is a higher
max_steps is not stale but extended from its last checkpoint (its extend key
is the input hash without max_steps). Checkpoint averaging (average_last, average_pick) is in
both: it decides which checkpoints Ray Train keeps, so changing it retrains the stage.
A student without imitation leaves λ2 and il_reduction out: it never reads them.

The data the first stage reads from outside the run dir is identified by its bytes, not its
path: the manifest records the sha256 of each input file (`input_digests`), and a file edited
in place makes that stage stale (and so, through the consumed digests, whatever its redo
changes). These digests are not in the input hash: that stays a function of the spec alone,
which reports, sweeps and shared stage dirs compute without the data at hand.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..spec.data import CorpusSpec, DataSpec
from ..spec.schema import JobSpec, StudentSpec
from .files import atomic_write_json, sha256_file, sha256_json
from .layout import STAGE, STAGES, TRAINING, run_dir
from .manifest import Manifest, read_manifest

DIGEST_CACHE = ".input-sha256.json"   # in the run dir: input file -> sha256, keyed by its stat
_RACY_NS = 2 * 10**9   # a file written this recently may change again within one mtime tick: not cached


# Fields added after run dirs existed, left out of a stage's identity at their defaults so
# those run dirs keep their hashes (and are not retrained for a setting that changes nothing),
# by spec section. eval.cpu_fast "auto" changes the evaluate stage's figures a little (the CPU
# path: BLEU within ±0.06 on Multi30k, faster latencies); a finished evaluate stage is kept
# (its summary names no CPU path: fp32) rather than every run dir's being redone.
_ADDED_AT_DEFAULT = {"teacher": {"seed": None, "valid_sentences": 500},
                     "student": {"seed": None, "valid_sentences": 500, "imitation_modules": True,
                                 "il_reduction": "mean"},
                     "eval": {"cpu_fast": "auto"}}


def _identity_sections(spec: JobSpec, stage: str) -> dict:
    """The spec sections in `stage`'s identity. A training section's averaging fields are left
    out while averaging is off, and fields added later at their defaults (_ADDED_AT_DEFAULT):
    they change nothing then, and run dirs from before they existed keep their hashes. A
    student with `copy: uniform` carries the copy's source: before 2026-12 that name copied
    the encoder's states (now `uniform_encoder`), so such a run dir's student is retrained."""
    sections = {name: getattr(spec, name).model_dump(mode="json") for name in STAGE[stage].reads}
    if stage in TRAINING and not sections[stage]["average_last"]:
        del sections[stage]["average_last"], sections[stage]["average_pick"]
    for section in sections.keys() & _ADDED_AT_DEFAULT.keys():
        for field, default in _ADDED_AT_DEFAULT[section].items():
            if sections[section][field] == default:
                del sections[section][field]
    if stage == "student" and sections[stage]["copy"] == "uniform":
        sections[stage]["copy_source"] = "embeddings"
    if stage == "student" and not sections[stage]["imitation"]:
        _without_imitation_weights(sections[stage])
    return sections


def _without_imitation_weights(student: dict) -> None:
    """A student trained without L_IL never reads λ2 or il_reduction: they leave its identity
    (λ2 at the schema's default, so run dirs from before keep their hashes). `ablate --set
    student.lambda2=X` then reuses the rows without imitation that another λ2 trained."""
    student["lambda2"] = StudentSpec.model_fields["lambda2"].default
    student.pop("il_reduction", None)


def stage_hashes(spec: JobSpec) -> dict[str, str]:
    hashes, upstream = {}, None
    for stage in STAGES:
        sections = _identity_sections(spec, stage)
        identity = {"stage": stage, "seed": spec.seed, "sections": sections, "upstream": upstream}
        if STAGE[stage].version > 1:   # (version 1 is left out: the hashes of run dirs made before versions)
            identity["version"] = STAGE[stage].version
        hashes[stage] = upstream = sha256_json(identity)
    return hashes


def extend_key(spec: JobSpec, stage: str) -> str | None:
    """A training stage's input hash with its max_steps left out (None for other stages): runs
    that agree on it differ at most in how long they train."""
    if stage not in TRAINING:
        return None
    sections = _identity_sections(spec, stage)
    del sections[stage]["max_steps"]
    upstream = stage_hashes(spec)[STAGES[STAGES.index(stage) - 1]]
    return sha256_json({"stage": stage, "seed": spec.seed, "sections": sections, "upstream": upstream,
                        "without": "max_steps"})


def max_steps(spec: JobSpec, stage: str) -> int | None:
    return getattr(spec, stage).max_steps if stage in TRAINING else None


def can_extend(m: Manifest | None, spec: JobSpec, stage: str) -> bool:
    """Did this stage dir train on the same inputs for at most the max_steps the spec asks now?
    (Fewer steps cannot be had from a longer run: that retrains.)"""
    key = extend_key(spec, stage)
    return (key is not None and m is not None and m.extend_key == key and m.max_steps is not None
            and m.max_steps <= max_steps(spec, stage))


def consumed_digests(rd: Path, stage: str) -> dict[str, str]:
    """sha256 of each earlier finished stage's recorded outputs, as `stage` would read them now."""
    out = {}
    for earlier in STAGES[: STAGES.index(stage)]:
        m = read_manifest(rd / earlier)
        if m is not None and m.status == "done":
            out[earlier] = sha256_json(m.outputs)
    return out


def upstream_changed(m: Manifest | None, consumed: dict[str, str]) -> bool:
    """Did an earlier stage's output change since this stage (manifest `m`) ran on it?"""
    return m is not None and bool(m.consumed) and m.consumed != consumed


def data_files(data: DataSpec) -> list[Path]:
    """The files the prepare stage reads, of data's source and of each data.extra_train corpus:
    a files corpus's split files (a valid split it carves from train has none), every file of a
    local Hugging Face dataset dir, the local files of hf_data_files. None for synthetic data
    (the spec determines it) or a Hub dataset (name, config and hf_revision in the spec identify
    it; without hf_revision a new version on the Hub is not noticed)."""
    files = _corpus_files(data, data, (data.train_prefix, data.valid_prefix, data.test_prefix))
    for corpus in data.extra_train:
        files += _corpus_files(corpus, data, (corpus.train_prefix,))
    return list(dict.fromkeys(files))   # a file two corpora name is read (and hashed) once


def _corpus_files(corpus: CorpusSpec, data: DataSpec, prefixes: tuple[str, ...]) -> list[Path]:
    if corpus.source == "files":
        paths = [Path(p) for prefix in prefixes for p in corpus.files_of(prefix, data.src_lang, data.tgt_lang)]
        return [p for p in paths if p.is_file()]
    if corpus.source != "huggingface":
        return []
    in_dir = sorted(p for p in Path(corpus.hf_name).rglob("*") if p.is_file()) if os.path.isdir(corpus.hf_name) else []
    return in_dir + [Path(f) for f in corpus.local_data_files()]


def input_digests(spec: JobSpec, stage: str) -> dict[str, str]:
    """sha256 of each file `stage` reads from outside the run dir (only prepare reads any), by
    absolute path. Hashing a multi-GB corpus at every `status` and `run` would take minutes, so
    hashes are cached in the run dir by (path, size, mtime_ns, ctime_ns): an edit changes the
    mtime, and one that restores it (touch -r, cp -p) still changes the ctime."""
    files = data_files(spec.data) if stage == STAGES[0] else []
    if not files:
        return {}
    cache_path = run_dir(spec) / DIGEST_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    out, changed = {}, False
    for p in files:
        key, st = str(p.resolve()), p.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        hit = cache.get(key)
        if isinstance(hit, dict) and hit.get("stat") == stamp and isinstance(hit.get("sha256"), str):
            out[key] = hit["sha256"]
            continue
        out[key] = sha256_file(p)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
            cache[key], changed = {"stat": stamp, "sha256": out[key]}, True
    if changed:
        atomic_write_json(cache_path, cache)   # two processes racing lose at most a cache entry
    return out


def inputs_changed(m: Manifest | None, digests: dict[str, str]) -> bool:
    """Did the files this stage (manifest `m`) read change since it ran? A manifest from before
    input digests were recorded (no package version) is taken as it is, like one without
    consumed digests: otherwise every existing run would retrain from scratch."""
    return m is not None and m.package_version is not None and m.inputs != digests
