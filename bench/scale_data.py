"""The data path at WMT scale: wall time and peak memory of every process, per stage, on a
synthetic parallel corpus of N pairs.

    python bench/scale_data.py --pairs 1000000
    python bench/scale_data.py --pairs 4500000 --json scale-4.5M.json
    python bench/scale_data.py --pairs 1000000 --old-ref 3e9b44e     # the in-memory path beside it

The corpus: two synthetic "languages" over a Zipf-distributed vocabulary of 60k word types
(random letter strings), sentence lengths log-normal around 27 words (~30 SentencePiece tokens
a side with the 32k vocabulary), the target a perturbed reordering of the source. Made once
per N and kept in --workdir.

Stages, each in a fresh subprocess (so its peak RSS is its own), with every descendant
process (Ray's workers included) sampled every 0.2 s for its RSS:
  prepare     read, normalize, filter, dedup, write (the job's `files` source)
  tokenizer   SentencePiece trained on a sample (tokenizer.max_sentences), then the train set
              binarized by Ray tasks (2 CPUs)
  plan        the batch plan written once (the training stage's driver does this before it
              starts its workers: imitate_nat.indexed.write_batch_plan)
  iterate     one pass of batch iteration on 2 ranks at once (2 processes: rank 0 and 1 of 2,
              batch_tokens 4096): every batch made into tensors as training would; a rank's
              data memory is its RSS after opening the data and its plan minus its RSS before
              (the old path: after tokenizing and planning)
With --old-ref, the same stages of that commit (which held corpora in Python lists) run on the
same corpus first, its iteration through its `load_pairs`/`batch_stream`.

A benchmark: it prints figures and the issue's targets beside them, it asserts nothing.
Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
MB = 2 ** 20


# ------------------------------------------------------------------------------ corpus --

def make_corpus(d: Path, pairs: int, seed: int = 0) -> None:
    """train/valid/test .en/.de under d (train: `pairs` lines), unless already there."""
    if (d / "done").is_file():
        return
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, n)) for n in rng.integers(2, 10, 60_000)]
    other = ["".join(rng.choice(letters, n)) for n in rng.integers(2, 11, 60_000)]
    zipf = 1.0 / np.arange(1, 60_001) ** 1.05
    zipf /= zipf.sum()
    for split, n in (("train", pairs), ("valid", 1000), ("test", 1000)):
        with open(d / f"{split}.en", "w") as fe, open(d / f"{split}.de", "w") as fd:
            done = 0
            while done < n:
                k = min(100_000, n - done)
                lens = np.clip(rng.lognormal(3.2, 0.45, k).astype(int), 1, 90)
                ids = rng.choice(60_000, size=int(lens.sum()), p=zipf)
                cuts = np.cumsum(lens)[:-1]
                src_lines, tgt_lines = [], []
                for sent in np.split(ids, cuts):
                    src_lines.append(" ".join(words[i] for i in sent))
                    t = sent[::-1] if rng.random() < 0.5 else np.roll(sent, 1)   # reorder
                    if rng.random() < 0.3:
                        t = t[:-1] if len(t) > 1 else t                          # length change
                    tgt_lines.append(" ".join(other[i] for i in t))
                fe.write("\n".join(src_lines) + "\n")
                fd.write("\n".join(tgt_lines) + "\n")
                done += k
    (d / "done").write_text("ok\n")


# --------------------------------------------------------------------- measuring --

class Sampler:
    """Peak RSS of a process and every descendant (Ray's workers included: they are children of
    the raylet that the process's ray.init started), sampled every `every` seconds."""

    def __init__(self, every: float = 0.2):
        self.every, self.peaks, self.workers, self._stop = every, {}, set(), threading.Event()

    def watch(self, pid: int) -> None:
        self.root = pid
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.root)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    rss, cmd = p.memory_info().rss, " ".join(p.cmdline())
                except psutil.Error:
                    continue
                # a Ray worker: "…/default_worker.py …" until it sets its title "ray::<task>"
                if cmd.startswith("ray::") or "default_worker.py" in cmd:
                    self.workers.add(p.pid)
                self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), rss)
            time.sleep(self.every)

    def stop(self) -> dict:
        self._stop.set()
        self.thread.join()
        return {"driver_peak_mb": self.peaks.get(self.root, 0) / MB,
                "ray_worker_peak_mb": max((self.peaks[p] for p in self.workers), default=0) / MB}


def run_child(code: str, env: dict, cwd: Path) -> tuple[dict, float, dict]:
    """Run `code` in a fresh Python; returns (its JSON result, seconds, sampled peaks)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sampler = Sampler()
    sampler.watch(proc.pid)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    peaks = sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), seconds, peaks


# ----------------------------------------------------------------- stage programs --

NEW_STAGE = """
import json, logging, resource, sys
from orchestrator.spec.loading import spec_from_dict
from orchestrator.run.runner import StageContext
from orchestrator.stages.{stage} import {stage}
spec = spec_from_dict(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {raw!r})
rd = {rd!r}
import pathlib; pathlib.Path(rd, "{stage}").mkdir(parents=True, exist_ok=True)
r = {stage}(StageContext(spec, pathlib.Path(rd), "{stage}", progress=False))
print(json.dumps(r.metrics))
"""

OLD_STAGE = NEW_STAGE.replace("from orchestrator.spec.loading import spec_from_dict",
                              "from orchestrator.spec_io import spec_from_dict").replace(
    "from orchestrator.run.runner import StageContext", "from orchestrator.stages import StageContext")

NEW_ITERATE = """
import json, sys, time
from orchestrator.stages.train_worker import TrainData, batch_stream
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) * 1024
rank, rd = int(sys.argv[1]), sys.argv[2]
before = rss()
data = TrainData(rd + "/tokenizer/train.src", rd + "/tokenizer/train.tgt", rd + "/plan")
steps = len(data.plan) // 2
stream = batch_stream(data, 1, 0, rank, 2)
opened = rss()
t0, sents = time.perf_counter(), 0
for _ in range(steps):
    _, micro, _, _ = next(stream)
    sents += sum(b.src.shape[0] for b in micro)
secs = time.perf_counter() - t0
print(json.dumps({"data_mb": (opened - before) / 2**20, "sentences": sents, "seconds": secs,
                  "after_pass_mb": (rss() - before) / 2**20}))
"""

NEW_PLAN = """
import json
from imitate_nat.indexed import write_batch_plan
rd = {rd!r}
print(json.dumps(write_batch_plan(rd + "/tokenizer/train.src", rd + "/tokenizer/train.tgt", 256, 4096, rd + "/plan")))
"""

OLD_ITERATE = """
import json, sys, time
from imitate_nat.tokenizer import Tokenizer
from orchestrator.train_loop import batch_stream, global_batches, load_pairs
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) * 1024
rank, rd = int(sys.argv[1]), sys.argv[2]
before = rss()
tok = Tokenizer(rd + "/tokenizer/spm.model")
src, tgt = load_pairs(rd + "/prepare/train.src", rd + "/prepare/train.tgt", tok, 256)
steps = len(global_batches(src, tgt, 4096, 0, 1))
stream = batch_stream(src, tgt, 4096, 1, 0, rank, 2)
opened = rss()
t0, sents = time.perf_counter(), 0
for _ in range(steps):
    _, batch, _, _ = next(stream)
    sents += batch.src.shape[0] if batch is not None else 0
secs = time.perf_counter() - t0
print(json.dumps({"data_mb": (opened - before) / 2**20, "sentences": sents, "seconds": secs,
                  "after_pass_mb": (rss() - before) / 2**20}))
"""


def iterate(program: str, env: dict, cwd: Path, rd: Path) -> dict:
    """Both ranks at once, each in its own process, sampled."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", program, str(r), str(rd)], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    samplers = []
    for p in procs:
        s = Sampler()
        s.watch(p.pid)
        samplers.append(s)
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"rank failed:\n{err[-4000:]}")
    ranks = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    peaks = [s.stop()["driver_peak_mb"] for s in samplers]
    return {"seconds": time.perf_counter() - t0,
            "rank_data_mb": max(r["data_mb"] for r in ranks),
            "rank_after_pass_mb": max(r["after_pass_mb"] for r in ranks),
            "rank_peak_mb": max(peaks),
            "sentences_per_s_per_rank": min(r["sentences"] / r["seconds"] for r in ranks)}


def run_path(name: str, code_root: Path, data_dir: Path, work: Path, pairs: int, max_sentences: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    rd = work / name / "scale"
    raw = {"name": "scale", "workdir": str(work / name), "seed": 1,
           "data": {"source": "files", "dir": str(data_dir), "src_lang": "en", "tgt_lang": "de",
                    "max_tokens": 250, "max_ratio": 3.0},
           "tokenizer": {"vocab_size": 32000, "max_sentences": max_sentences},
           "ray": {"num_cpus": 2, "include_dashboard": False}}
    template = NEW_STAGE if name == "new" else OLD_STAGE
    out = {}
    for stage in ("prepare", "tokenizer"):
        metrics, seconds, peaks = run_child(template.format(stage=stage, raw=raw, rd=str(rd)), env, code_root)
        parts = {k: metrics[k] for k in ("trainer_seconds", "binarize_seconds") if k in metrics}
        out[stage] = {"seconds": seconds, "pairs_per_s": pairs / seconds, **peaks, **parts}
        print(f"  {name:<4}{stage:<10}{seconds:8.1f} s  {pairs / seconds:9.0f} pairs/s  driver peak "
              f"{peaks['driver_peak_mb']:7.0f} MB  Ray worker peak {peaks['ray_worker_peak_mb']:6.0f} MB"
              + "".join(f"  {k.split('_')[0]} {v:.1f} s" for k, v in parts.items()), flush=True)
    if name == "new":   # the training stage's driver plans the batches once, for its workers
        _, seconds, peaks = run_child(NEW_PLAN.format(rd=str(rd)), env, code_root)
        out["plan"] = {"seconds": seconds, **peaks}
        print(f"  {name:<4}{'plan':<10}{seconds:8.1f} s  driver peak {peaks['driver_peak_mb']:7.0f} MB", flush=True)
    out["iterate"] = it = iterate(NEW_ITERATE if name == "new" else OLD_ITERATE, env, code_root, rd)
    print(f"  {name:<4}{'iterate':<10}{it['seconds']:8.1f} s  {it['sentences_per_s_per_rank']:9.0f} sent/s/rank  "
          f"rank data {it['rank_data_mb']:6.0f} MB (after a pass {it['rank_after_pass_mb']:.0f})  "
          f"rank peak {it['rank_peak_mb']:6.0f} MB", flush=True)
    total = out["prepare"]["seconds"] + out["tokenizer"]["seconds"]
    out["prepare_tokenizer_pairs_per_s"] = pairs / total
    return out


def old_tree(ref: str) -> Path:
    """The project at `ref`, checked out beside (git worktree), reused across runs."""
    path = Path(f"/tmp/imitate-orch-{ref}")
    if not path.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref], check=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/imitate-scale"))
    ap.add_argument("--max-sentences", type=int, default=1_000_000,
                    help="tokenizer.max_sentences: sentences sampled to train SentencePiece")
    ap.add_argument("--old-ref", default=None, help="also run the data path of this commit (in-memory lists)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    print(f"{platform.node()}: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"load {os.getloadavg()[0]:.2f}; {a.pairs:,} pairs", flush=True)
    data = a.workdir / f"data-{a.pairs}"
    t0 = time.perf_counter()
    make_corpus(data, a.pairs)
    print(f"  corpus ready in {time.perf_counter() - t0:.0f} s: {data}", flush=True)
    work = a.workdir / f"run-{a.pairs}"
    results = {"pairs": a.pairs, "cpus": os.cpu_count(), "max_sentences": a.max_sentences}
    if a.old_ref:
        results["old"] = run_path("old", old_tree(a.old_ref), data, work, a.pairs, a.max_sentences)
    results["new"] = run_path("new", ROOT, data, work, a.pairs, a.max_sentences)
    n = results["new"]
    print(f"targets at 4.5M pairs: rank data ≤ 300 MB (here {n['iterate']['rank_data_mb']:.0f}); driver ≤ 2 GB "
          f"(here {max(n[s]['driver_peak_mb'] for s in ('prepare', 'tokenizer')):.0f} MB); prepare+tokenizer "
          f"≥ 20k pairs/s (here {n['prepare_tokenizer_pairs_per_s']:.0f}); iteration ≥ 50k sentences/s per rank "
          f"(here {n['iterate']['sentences_per_s_per_rank']:.0f})")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
