"""Bad job specs through the real CLI (`python -m orchestrator.cli run`): each exits 2 with a
message naming the field, and nothing is started: no run directory, and for errors in the spec
itself no Ray session at all. A job that asks for more than the Ray cluster has can only be
judged once connected: then Ray is started, compared, and stopped again before any stage runs.

The cases run as parallel subprocesses (a module fixture); each case is then its own test.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

# (case id, --set overrides ({tmp} is the case's own directory), text(s) stderr must contain)
SPEC_ERRORS = [
    ("unknown key", ["bogus=1"], ["bogus: Extra inputs are not permitted"]),
    ("typo in a key", ["teacher.lrr=1"], ["teacher.lrr", "did you mean 'lr'"]),
    ("string for an int", ["teacher.max_steps=many"], ["teacher.max_steps"]),
    ("string for a bool", ["student.imitation=maybe"], ["student.imitation"]),
    ("scalar for a section", ["teacher=5"], ["teacher: "]),
    ("negative shards", ["distill.shards=-1"], ["distill.shards"]),
    ("negative vocab", ["tokenizer.vocab_size=-5"], ["tokenizer.vocab_size"]),
    ("zero batch", ["teacher.batch_tokens=0"], ["teacher.batch_tokens"]),
    ("negative corpus size", ["data.synthetic.train_size=-10"], ["data.synthetic.train_size"]),
    ("delta_t out of range", ["eval.delta_t=21"], ["eval.delta_t"]),
    ("unknown BLEU tokenizer", ["eval.bleu_tokenize=bogus"],
     ["eval.bleu_tokenize: 'bogus' is not a sacreBLEU BLEU tokenizer; one of"]),
    ("unknown choice", ["student.copy=hard"], ["student.copy"]),
    ("unknown CPU path", ["eval.cpu_fast=fast"], ["eval.cpu_fast: Input should be 'auto', 'int8', 'bf16' or 'off'"]),
    ("imitation without modules", ["student.imitation_modules=false"],
     ["student.imitation_modules: false leaves nothing to imitate with"]),
    ("unknown L_IL reduction", ["student.il_reduction=batch"], ["student.il_reduction: Input should be"]),
    ("negative student seed", ["student.seed=-1"], ["student.seed: Input should be greater than"]),
    ("negative average_last", ["teacher.average_last=-1"], ["teacher.average_last: Input should be greater than"]),
    ("average of one checkpoint", ["student.average_last=1"], ["student.average_last: 1 would average a single"]),
    ("unknown average_pick", ["teacher.average_pick=best"], ["teacher.average_pick: Input should be"]),
    ("heads do not divide d_model", ["model.n_heads=3"], ["model: ", "divisible"]),
    ("name unusable in paths", ["name=bad name"], ["name: "]),
    ("same language twice", ["data.src_lang=de"], ["data.tgt_lang"]),
    ("files without a dir", ["data.source=files"], ["data.dir: required"]),
    ("dir not found", ["data.source=files", "data.dir={tmp}/nowhere"], ["data.dir: directory not found"]),
    ("dir lacks train.de", ["data.source=files", "data.dir={tmp}/corpus"],
     ["data.train_prefix: missing file(s) in data.dir", "train.de"]),
    ("hf without a name", ["data.source=huggingface"], ["data.hf_name"]),
    ("one text column of two", ["data.source=huggingface", "data.hf_name=json", "data.hf_src_column=en"],
     ["data.hf_tgt_column: hf_src_column and hf_tgt_column are set together"]),
    ("hf data file not found", ["data.source=huggingface", "data.hf_name=json",
                                "data.hf_data_files={{train: {tmp}/nowhere.jsonl}}"],
     ["data.hf_data_files: train: no file matches", "nowhere.jsonl"]),
    ("extra train on synthetic data", ["data.extra_train=[{{source: files, dir: {tmp}/corpus}}]"],
     ["data.extra_train: needs data.source files or huggingface"]),
    ("extra train lacks train.de", ["data.source=huggingface", "data.hf_name=wmt14",
                                    "data.extra_train=[{{source: files, dir: {tmp}/corpus}}]"],
     ["data.extra_train[0].train_prefix: missing file(s)", "train.de"]),
    ("extra train of an unknown source", ["data.source=huggingface", "data.hf_name=wmt14",
                                          "data.extra_train=[{{source: synthetic}}]"],
     ["data.extra_train[0].source"]),
    ("extra hf train without a name", ["data.source=huggingface", "data.hf_name=wmt14",
                                       "data.extra_train=[{{source: huggingface}}]"],
     ["data.extra_train[0].hf_name: required"]),
    ("tracking uri without scheme", ["tracking.uri=runs/mlflow.db"], ["tracking.uri: needs a scheme"]),
    ("workdir is a file", ["workdir={tmp}/a-file"], ["workdir: exists and is not a directory"]),
    ("override without =", ["teacher.lr"], ["teacher.lr: override must look like key.path=value"]),
    ("unparsable value", ["teacher.lr=[1, 2"], ["teacher.lr: cannot parse value"]),
]
# Judged against the running cluster: a local one of 2 CPUs and whatever GPUs the machine has.
# One Ray start each, so the three too-large requests share a case (all three are reported).
CLUSTER_ERRORS = [
    ("worker or actor larger than any node",
     ["teacher.gpus_per_worker=64", "distill.gpus_per_actor=64", "student.cpus_per_worker=64"],
     ["teacher.gpus_per_worker: 64 GPU per worker", "distill.gpus_per_actor: 64 GPU per actor",
      "student.cpus_per_worker: 64 CPU per worker"]),
    ("worker group larger than the cluster", ["teacher.workers=3"], ["teacher.workers: 3 workers", "can place only 1"]),
]
CASES = [(*c, False) for c in SPEC_ERRORS] + [(*c, True) for c in CLUSTER_ERRORS]


def run_case(case, base: Path) -> dict:
    name, overrides, _, _ = case
    tmp = base / name.replace(" ", "-")
    (tmp / "corpus").mkdir(parents=True)
    (tmp / "corpus" / "train.en").write_text("a\n")       # train.de missing
    (tmp / "a-file").write_text("")
    before = sorted(p.name for p in tmp.iterdir())
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths go under it
    sets = [f"workdir={tmp}/runs", "ray.num_cpus=2", "ray.object_store_memory=100000000",
            *[o.format(tmp=tmp) for o in overrides]]
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "jobs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    ray_dir = Path(ray_tmp) / "ray"
    return {"rc": r.returncode, "stderr": r.stderr, "new_files": sorted({p.name for p in tmp.iterdir()} - set(before)),
            "ray_sessions": sorted(p.name for p in ray_dir.glob("session_2*")) if ray_dir.is_dir() else [],
            "ray_tmp": ray_tmp}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    with ThreadPoolExecutor(max_workers=3) as pool:   # each run is mostly Python start-up (imports)
        results = list(pool.map(lambda c: run_case(c, base), CASES))
    yield {case[0]: result for case, result in zip(CASES, results)}
    for r in results:
        shutil.rmtree(r["ray_tmp"], ignore_errors=True)


def ray_processes_under(path: str) -> list[int]:
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(path in arg for arg in p.info["cmdline"] or []):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


def test_every_section_a_stage_reads_has_a_bad_input_case_naming_it():
    """The table covers the spec the pipeline reads: a section a stage starts to read (run/layout.py)
    without a case here fails this test."""
    from orchestrator.run.layout import STAGE_TABLE

    named = {re.split(r"[.:]", text)[0] for case in CASES for text in case[2]}
    assert {"name", "workdir"} | {section for stage in STAGE_TABLE for section in stage.reads} <= named


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_exits_2_naming_the_field_and_starts_nothing(outcomes, case):
    name, _, expected, needs_cluster = case
    out = outcomes[name]
    assert out["rc"] == 2, out["stderr"][-2000:]
    for text in expected:
        assert text in out["stderr"], out["stderr"][-2000:]
    assert "Traceback" not in out["stderr"]
    assert out["new_files"] == []                          # no run dir, no MLflow store
    if needs_cluster:
        assert "no stage was started" in out["stderr"] and len(out["ray_sessions"]) == 1
        assert ray_processes_under(out["ray_tmp"]) == []   # the local Ray it started is gone again
    else:
        assert out["ray_sessions"] == []                   # Ray was never started
