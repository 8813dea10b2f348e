"""Sequence-level distillation: the AT teacher beam-decodes the training sources.

The train source is cut into contiguous, balanced shards: line ranges, handed out as byte
ranges of prepare/train.src. A pool of Ray actors, each holding the teacher and tokenizer
(loaded once), reads its shard's lines itself from the shared run dir, translates them and
writes the shard with `write_shard` (run/shards.py: atomic, done marker last); the driver only
hands out ranges and gets back small dicts, and never holds the corpus. A shard whose output verifies (`shard_done`) is never redone, so an
interrupted run resumes and deleting or corrupting one shard redoes only that shard. The merge
streams the shards in order into train.distilled.tgt (line i translates line i of train.src),
which is then binarized for the student like the tokenizer stage binarizes the train set.

Shards are written by the actors into `<run dir>/distill/shards/`, and the actors read the
teacher and tokenizer from the run dir: on a multi-node cluster the run dir must be on storage
every node sees (NFS, a mounted bucket); on one machine a local directory is fine. Each done
marker records the Ray node that made its shard (the stage's `nodes` metric counts them).

`shards/plan.json` fingerprints what the shards depend on (input, teacher, tokenizer, decoding
settings, shard bounds); if it changed since the shards were written, they are all discarded,
so a rerun with a new teacher never reuses stale translations; each shard's done marker carries
the plan's hash, so neither does a shard that an actor of an earlier, killed driver writes after
that (it is redone, and checked again before the merge). batch_tokens and the pool size
are not in the plan: they change speed, not (beyond float rounding) the output. The precision setting
is in it (bf16 changes some translations); `auto` is resolved by each actor from its device,
bf16 on CUDA and fp32 on the CPU, so actors that ask Ray for GPUs CUDA cannot see (Ray's fake
autoscaler nodes) decode like CPU actors.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import ray
import torch
from tqdm.auto import tqdm

from imitate_nat.atomic import atomic_writer
from imitate_nat.checkpoint import load_model
from imitate_nat.data import count_lines
from imitate_nat.tokenizer import Tokenizer
from imitate_nat.translate import at_beam, translate

from ..binarize import binarize, line_byte_ranges, read_range
from ..run.cluster import check_fits_cluster, init_ray
from ..run.files import atomic_write_json, sha256_file, sha256_json
from ..run.layout import DISTILLED, model_path, spm_path
from ..run.runner import StageContext, StageResult
from ..run.shards import shard_done, shard_marker, shard_path, write_shard

log = logging.getLogger(__name__)

DECODE_KEYS = ("beam_size", "batch_tokens", "length_penalty", "max_len_a", "max_len_b", "precision")
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # precision -> autocast dtype


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype of a distill.precision on `device` (None: fp32, no autocast). auto is
    bf16 on CUDA and fp32 on the CPU, where bf16 is slower without bf16 matrix units
    (BENCHMARKS.md, "Distillation precision"); fp16 on the CPU is an error."""
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise ValueError(f"distill.precision fp16 needs a CUDA device; this decoding runs on {device}")
    return AUTOCAST[precision]


def beam_translate(model, tok, lines, beam_size=4, batch_tokens=4096, length_penalty=1.0,
                    max_len_a=1.5, max_len_b=10, device="cpu", min_len=0, precision="fp32") -> list[str]:
    """Beam-decode `lines` in token-bucketed batches (source length × beam ≤ batch_tokens);
    one detokenized line per input, in input order (imitate_nat.translate does the work).
    precision (distill.precision): bf16/fp16 run the model under torch autocast; beam_search
    sums its scores in fp32 either way."""
    decoder = at_beam(model, beam_size, length_penalty, max_len_a, max_len_b, min_len)
    dtype = autocast_dtype(precision, device)
    with torch.autocast(torch.device(device).type, dtype=dtype) if dtype else nullcontext():
        return translate(list(lines), tok, decoder, batch_tokens=batch_tokens, device=device,
                         max_src_len=model.cfg.max_positions, cost_factor=beam_size)


@ray.remote(max_restarts=2, max_task_retries=-1)
class DistillWorker:
    """Holds the teacher and tokenizer; translates and writes whole shards. Calls are retried
    on a restarted actor after a crash, which is safe: a shard write is atomic and idempotent."""

    def __init__(self, model_path: str, spm_path: str, shard_dir: str, decode: dict,
                 cpus: float = 1, gpus: float = 0):
        torch.set_num_threads(max(1, int(cpus)))
        self.device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
        self.model, _ = load_model(model_path, self.device)
        self.tok = Tokenizer(spm_path)
        self.shard_dir, self.decode = shard_dir, dict(decode)

    def ready(self) -> str:
        return self.device

    def translate_shard(self, index: int, src_path: str, start: int, end: int, plan: str | None = None) -> dict:
        """Translate the lines in bytes [start, end) of the source file (read here, from the
        shared run directory: the driver never holds the corpus) and write them as shard `index`,
        its marker naming `plan` (the hash of the plan the job came from)."""
        t0 = time.perf_counter()
        out = beam_translate(self.model, self.tok, read_range(src_path, start, end), device=self.device, **self.decode)
        node = ray.get_runtime_context().get_node_id()   # kept in the marker: where each shard was made
        write_shard(self.shard_dir, index, out, node=node, plan=plan)
        return {"index": index, "n": len(out), "seconds": time.perf_counter() - t0, "node": node}


def shard_bounds(n_lines: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges, sizes differing by at most one; no empty shard."""
    k = min(shards, n_lines)
    return [(i * n_lines // k, (i + 1) * n_lines // k) for i in range(k)]


def make_workers(n: int, model_path, spm_path, shard_dir, decode: dict, cpus: float = 1,
                 gpus: float = 0) -> list:
    opts = dict(num_cpus=cpus, num_gpus=gpus)
    return [DistillWorker.options(**opts).remote(str(model_path), str(spm_path), str(shard_dir),
                                                 decode, cpus, gpus) for _ in range(n)]


def run_pool(workers: list, jobs: list[tuple], on_done=None) -> tuple[float, int]:
    """Translate `jobs` [(shard index, source path, byte start, byte end[, plan hash])] on
    `workers`, one shard in flight per actor, each actor taking the next shard as soon as it is
    ready or done (load balancing). An actor that dies for good (restarts exhausted) is dropped
    and its shard goes back in the queue. An actor that never starts (the cluster has no room
    for it) is not waited for once every shard is done. Returns (seconds from the first ready
    actor to the last shard, sentences translated); calls `on_done(result_dict)` after each
    shard."""
    queue, live, idle = list(reversed(jobs)), list(workers), []
    refs = {w.ready.remote(): (w, None) for w in live}
    t0, sentences = None, 0
    while queue or any(job is not None for _, job in refs.values()):
        [ref], _ = ray.wait(list(refs), num_returns=1)
        worker, job = refs.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            live.remove(worker)
            if job is not None:
                queue.append(job)           # next to be handed out
            log.warning("distill actor died (%s); %d left", type(e).__name__, len(live))
            if not live and queue:
                raise RuntimeError(f"all distillation actors died; {len(queue)} shard(s) left") from e
        else:
            if t0 is None:
                t0 = time.perf_counter()
            if job is not None:
                sentences += result["n"]
                if on_done:
                    on_done(result)
            idle.append(worker)
        while queue and idle:
            job, worker = queue.pop(), idle.pop()
            refs[worker.translate_shard.remote(*job)] = (worker, job)
    return (time.perf_counter() - t0 if t0 is not None else 0.0), sentences


def _check_plan(shard_dir: Path, plan: dict) -> None:
    """Discard existing shards unless they were made from exactly these inputs and bounds."""
    path = shard_dir / "plan.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if old == plan:
        return
    stale = [p for p in shard_dir.glob("shard-*") if p.is_file()] if shard_dir.is_dir() else []
    if stale:
        log.info("distill: inputs changed; discarding %d stale shard file(s)", len(stale))
    for p in stale:
        p.unlink(missing_ok=True)
    atomic_write_json(path, plan)


def distill(ctx: StageContext) -> StageResult:
    t_start = time.perf_counter()
    spec, ds = ctx.spec, ctx.spec.distill
    src_path = ctx.stage_path("prepare", "train.src")
    teacher_file = model_path(ctx.run_dir, "teacher").resolve()
    spm_file = spm_path(ctx.run_dir).resolve()
    shard_dir = (ctx.out_dir / "shards").resolve()
    shard_dir.mkdir(parents=True, exist_ok=True)

    n_lines = count_lines(src_path)
    bounds = shard_bounds(n_lines, ds.shards)
    decode = {k: getattr(ds, k) for k in DECODE_KEYS}
    plan = {"source_sha256": sha256_file(src_path),
            "teacher_sha256": sha256_file(teacher_file),
            "tokenizer_sha256": sha256_file(spm_file),
            "decode": {k: v for k, v in decode.items() if k != "batch_tokens"},
            "bounds": [list(b) for b in bounds]}
    _check_plan(shard_dir, plan)
    plan_hash = sha256_json(plan)   # in each shard's marker, checked below and before the merge
    for debris in shard_dir.glob(".shard-*.tmp"):    # left by a write killed mid-way
        debris.unlink(missing_ok=True)

    byte_ranges = line_byte_ranges(src_path, bounds)
    todo = [(i, str(src_path), *byte_ranges[i], plan_hash) for i, (a, b) in enumerate(bounds)
            if not shard_done(shard_dir, i, b - a, plan_hash)]
    reused = len(bounds) - len(todo)
    log.info("distill: %d lines, %d shards (%d already done)", n_lines, len(bounds), reused)

    seconds, translated = 0.0, 0
    if todo:
        init_ray(spec)
        check_fits_cluster(spec, sections=("distill",))   # an actor no node can hold would wait for ever
        workers = make_workers(min(ds.actors, len(todo)), teacher_file, spm_file, shard_dir, decode,
                               ds.cpus_per_actor, ds.gpus_per_actor)
        bar = tqdm(total=len(bounds), initial=reused, unit="shard", desc="distill",
                   disable=not ctx.progress)
        state = {"done": reused, "sent": 0, "t0": time.perf_counter()}

        def on_done(r: dict) -> None:
            state["done"] += 1
            state["sent"] += r["n"]
            bar.update(1)
            bar.set_postfix(sent_per_s=f"{state['sent'] / (time.perf_counter() - state['t0']):.1f}")
            ctx.tracker.log_metric("distill/shards_done", state["done"], step=state["done"])

        try:
            seconds, translated = run_pool(workers, todo, on_done)
        finally:
            bar.close()
            for w in workers:
                ray.kill(w)

    bad = [i for i, (a, b) in enumerate(bounds) if not shard_done(shard_dir, i, b - a, plan_hash)]
    if bad:
        raise RuntimeError(f"distill: shard(s) {bad} missing or incomplete after translation")
    out = ctx.out_dir / DISTILLED
    with atomic_writer(out, "wb") as f:   # the shards streamed in order: line i translates line i of train.src
        for i in range(len(bounds)):
            with open(shard_path(shard_dir, i), "rb") as shard:
                shutil.copyfileobj(shard, f)
    n_out = binarize(out, spm_file, ctx.out_dir / DISTILLED, progress=ctx.progress)   # for the student
    if n_out != n_lines:
        raise RuntimeError(f"distill: merged {n_out} lines, expected {n_lines}")

    nodes = {(shard_marker(shard_dir, i) or {}).get("node") for i in range(len(bounds))}
    metrics = {"lines": float(n_lines), "shards": float(len(bounds)), "shards_reused": float(reused),
               "nodes": float(len(nodes - {None})),   # distinct Ray nodes that made the shards
               "sentences_per_s": translated / seconds if seconds > 0 else 0.0,
               "seconds": time.perf_counter() - t_start}
    ctx.tracker.log_metrics({f"distill/{k}": v for k, v in metrics.items()})
    outputs = {name: name for name in (DISTILLED, f"{DISTILLED}.bin", f"{DISTILLED}.idx")}
    return StageResult(outputs=outputs, metrics=metrics)
