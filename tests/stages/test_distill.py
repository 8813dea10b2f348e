"""Distillation stage on a real local Ray runtime: shards, order, resume, redo of bad shards.

A random-init tiny teacher is enough: these tests check the mechanics (one line out per line
in, original order, which shards are redone), not translation quality. max_len_b is small so
decoding is fast.
"""
import json
import shutil

import pytest
import torch

ray = pytest.importorskip("ray")

from imitate_nat import ATDemonstrator, preset  # noqa: E402
from imitate_nat.checkpoint import load_model, save_model  # noqa: E402
from imitate_nat.synthetic import generate_corpus  # noqa: E402
from imitate_nat.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from orchestrator.run.files import atomic_write_json, sha256_json
from orchestrator.run.runner import StageContext  # noqa: E402
from orchestrator.run.shards import read_shard, shard_done, shard_marker, write_shard
from orchestrator.spec.loading import SpecError, spec_from_dict  # noqa: E402
from orchestrator.binarize import line_byte_ranges  # noqa: E402
from orchestrator.stages.distill import beam_translate, distill, shard_bounds  # noqa: E402

N_LINES, SHARDS = 203, 9           # uneven on purpose: shard sizes 22 and 23
DECODE = dict(beam_size=2, batch_tokens=256, length_penalty=1.0, max_len_a=0, max_len_b=8)


class RecordingTracker:
    def __init__(self):
        self.metrics = []

    def log_metric(self, key, value, step=None):
        self.metrics.append((key, value, step))

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            self.log_metric(k, v, step)



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "t"
    (run / "prepare").mkdir(parents=True)
    pairs = generate_corpus(N_LINES - 3, seed=3, vocab_words=60)
    # Edge cases: an empty source line and a stray carriage return must not change the count.
    src = [s for s, _ in pairs[:50]] + ["", "a\rb"] + [s for s, _ in pairs[50:]] + ["x"]
    assert len(src) == N_LINES
    (run / "prepare" / "train.src").write_bytes("".join(s + "\n" for s in src).encode())
    tgt = [t for _, t in pairs[:50]] + ["", "ab"] + [t for _, t in pairs[50:]] + ["x"]
    (run / "prepare" / "train.tgt").write_text("".join(t + "\n" for t in tgt))
    tok = train_sentencepiece([run / "prepare" / "train.src", run / "prepare" / "train.tgt"],
                              run / "tokenizer" / "spm.model", vocab_size=200)
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_heads=2, d_ffn=64, enc_layers=1,
                 dec_layers=1, n_actions=8)
    save_model(_sharpened(ATDemonstrator(cfg)), run / "teacher" / "model.pt")
    return run, src


def _sharpened(model):
    """A plain random init ignores its source (every output is the same token repeated); larger
    encoder outputs and a sharper, stronger cross-attention make the output depend on the input,
    so the order checks below mean something."""
    xa = model.decoder.layers[0].cross_attn
    with torch.no_grad():
        for p in (model.encoder.norm.weight, xa.out.weight, xa.q.weight, xa.k.weight):
            p.mul_(4.0)
    return model.eval()


def _ctx(run, actors=2, **distill_settings):
    spec = spec_from_dict({"name": "t", "distill": {"shards": SHARDS, "actors": actors, **DECODE, **distill_settings}})
    return StageContext(spec=spec, run_dir=run, stage="distill", tracker=RecordingTracker(),
                        progress=False)


def _reference(run, src, precision="fp32"):
    """Single-process translation, shard by shard with the actors' batching and 1 thread."""
    model, _ = load_model(run / "teacher" / "model.pt")
    tok = Tokenizer(run / "tokenizer" / "spm.model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return model, tok, [line for a, b in shard_bounds(len(src), SHARDS)
                            for line in beam_translate(model, tok, src[a:b], device="cpu", precision=precision,
                                                       **DECODE)]
    finally:
        torch.set_num_threads(threads)


def shard_jobs(run, shards):
    """run_pool's jobs as the stage makes them: (shard index, source file, byte range)."""
    path = run / "prepare" / "train.src"
    bounds = shard_bounds(N_LINES, shards)
    return [(i, str(path), a, b) for i, (a, b) in enumerate(line_byte_ranges(path, bounds))]


def _shard_files(run):
    return sorted((run / "distill" / "shards").glob("shard-*.txt"))


def test_shard_bounds_balanced_and_contiguous():
    b = shard_bounds(203, 9)
    assert b[0][0] == 0 and b[-1][1] == 203 and all(x[1] == y[0] for x, y in zip(b, b[1:]))
    assert {e - s for s, e in b} == {22, 23}
    assert shard_bounds(3, 9) == [(0, 1), (1, 2), (2, 3)]
    assert shard_bounds(0, 9) == []


def test_two_actors_many_shards_one_line_per_input_in_order(ray_local, run_dir):
    run, src = run_dir
    ctx = _ctx(run)
    res = distill(ctx)
    out_path = run / "distill" / res.outputs["train.distilled.tgt"]
    out = out_path.read_bytes().decode().split("\n")[:-1]
    assert len(out) == N_LINES and out_path.read_bytes().count(b"\n") == N_LINES
    model, tok, ref = _reference(run, src)
    assert out == ref                           # same computation as the actors: exactly equal
    assert len(set(out)) > N_LINES // 2         # the (sharpened) random teacher depends on its input
    # Other batchings (all lines in one call; one sentence at a time) may differ only by float
    # rounding at near-ties (measured: identical here); a shuffled order would match ~nothing.
    whole = beam_translate(model, tok, src, device="cpu", **{**DECODE, "batch_tokens": 10**9})
    assert sum(a == b for a, b in zip(whole, out)) >= 0.98 * N_LINES
    one_by_one = [beam_translate(model, tok, [s], device="cpu", **DECODE)[0] for s in src[:60]]
    assert sum(a == b for a, b in zip(one_by_one, out[:60])) >= 58
    assert out[50] == beam_translate(model, tok, [""], device="cpu", **DECODE)[0]
    m = res.metrics
    assert (m["lines"], m["shards"], m["shards_reused"]) == (N_LINES, SHARDS, 0)
    assert m["sentences_per_s"] > 0 and m["seconds"] > 0
    steps = [s for k, _, s in ctx.tracker.metrics if k == "distill/shards_done"]
    assert sorted(steps) == list(range(1, SHARDS + 1))
    assert len(_shard_files(run)) == SHARDS


def test_deleted_or_corrupt_shard_is_the_only_one_redone(ray_local, run_dir):
    run, src = run_dir
    distill(_ctx(run))                                   # complete state (no-op if already done)
    shards = run / "distill" / "shards"
    merged = (run / "distill" / "train.distilled.tgt").read_bytes()
    files = _shard_files(run)
    files[3].unlink()                                     # deleted output
    data = files[6].read_bytes()                          # same length, different bytes
    files[6].write_bytes(b"#" + data[1:])
    before = {p.name: p.stat().st_mtime_ns for p in files if p.exists()}
    res = distill(_ctx(run))
    assert res.metrics["shards_reused"] == SHARDS - 2
    after = {p.name: p.stat().st_mtime_ns for p in _shard_files(run)}
    changed = {n for n in before if after[n] != before[n]}
    assert changed == {files[6].name} and files[3].name in after
    assert (run / "distill" / "train.distilled.tgt").read_bytes() == merged
    assert all(shard_done(shards, i, b - a) for i, (a, b) in enumerate(shard_bounds(N_LINES, SHARDS)))


def test_marker_with_wrong_line_count_is_redone_and_all_done_needs_no_actors(ray_local, run_dir):
    run, src = run_dir
    distill(_ctx(run))
    shards = run / "distill" / "shards"
    marker = shards / "shard-00005.done"
    info = json.loads(marker.read_text())
    info["lines"] += 1
    atomic_write_json(marker, info)
    before = {p.name: p.stat().st_mtime_ns for p in _shard_files(run)}
    res = distill(_ctx(run, actors=1))
    assert res.metrics["shards_reused"] == SHARDS - 1
    after = {p.name: p.stat().st_mtime_ns for p in _shard_files(run)}
    assert {n for n in before if after[n] != before[n]} == {"shard-00005.txt"}
    assert json.loads(marker.read_text())["lines"] == info["lines"] - 1
    # Everything done: nothing translated, the merge is rebuilt from the shards.
    (run / "distill" / "train.distilled.tgt").unlink()
    res = distill(_ctx(run))
    assert res.metrics["shards_reused"] == SHARDS and res.metrics["sentences_per_s"] == 0
    assert (run / "distill" / "train.distilled.tgt").read_bytes().count(b"\n") == N_LINES


def test_a_valid_looking_shard_made_for_an_old_plan_is_redone(ray_local, run_dir):
    """An actor of a killed driver can finish its shard after a new run rewrote plan.json (a
    new teacher) and discarded the old shards: line count and checksum verify, but its marker
    names the old plan, so it is translated again and never merged."""
    run, src = run_dir
    distill(_ctx(run))
    shards = run / "distill" / "shards"
    merged = (run / "distill" / "train.distilled.tgt").read_bytes()
    plan = sha256_json(json.loads((shards / "plan.json").read_text()))
    a, b = shard_bounds(N_LINES, SHARDS)[4]
    write_shard(shards, 4, ["stale translation"] * (b - a), node="old-driver", plan="0" * 64)
    res = distill(_ctx(run, actors=1))
    assert res.metrics["shards_reused"] == SHARDS - 1
    assert (run / "distill" / "train.distilled.tgt").read_bytes() == merged
    assert shard_marker(shards, 4)["plan"] == plan and shard_done(shards, 4, b - a, plan)
    lines = read_shard(shards, 4)
    write_shard(shards, 4, lines)                   # a marker without a plan (older code's) is no better
    assert shard_done(shards, 4, b - a) and not shard_done(shards, 4, b - a, plan)
    write_shard(shards, 4, lines, plan=plan)        # (the module's run dir stays complete)


def test_changed_teacher_discards_stale_shards(ray_local, run_dir, tmp_path):
    run, src = run_dir
    distill(_ctx(run))
    model_file = run / "teacher" / "model.pt"
    saved = model_file.read_bytes()
    try:
        model, _ = load_model(model_file)
        torch.manual_seed(1)
        save_model(_sharpened(ATDemonstrator(model.cfg)), model_file)
        res = distill(_ctx(run))
        assert res.metrics["shards_reused"] == 0
    finally:
        model_file.write_bytes(saved)


def test_bf16_precision_reaches_the_actors_and_the_plan(ray_local, run_dir, tmp_path):
    """distill.precision bf16: the actors decode under bf16 autocast (their shards equal an
    in-process bf16 decode, and differ from auto's, which is fp32 on the CPU: the first test),
    and the plan records it, so a change of precision redoes the shards."""
    run, src = run_dir
    distill(_ctx(run))                                    # auto
    auto_plan = json.loads((run / "distill" / "shards" / "plan.json").read_text())
    auto_out = (run / "distill" / "train.distilled.tgt").read_text().split("\n")[:-1]
    copy = tmp_path / "t"                                 # the module's run dir keeps its fp32 shards
    for stage in ("prepare", "tokenizer", "teacher"):
        shutil.copytree(run / stage, copy / stage)
    res = distill(_ctx(copy, precision="bf16"))
    plan = json.loads((copy / "distill" / "shards" / "plan.json").read_text())
    assert auto_plan["decode"]["precision"] == "auto"
    assert plan == {**auto_plan, "decode": {**auto_plan["decode"], "precision": "bf16"}}   # only that differs
    assert res.metrics["shards_reused"] == 0
    bounds = shard_bounds(N_LINES, SHARDS)
    assert all(shard_done(copy / "distill" / "shards", i, b - a) for i, (a, b) in enumerate(bounds))
    out = (copy / "distill" / "train.distilled.tgt").read_text().split("\n")[:-1]
    assert out == _reference(copy, src, precision="bf16")[2]
    assert out != auto_out and sum(a == b for a, b in zip(out, auto_out)) >= 0.5 * N_LINES
    with pytest.raises(SpecError, match="distill.precision: fp16 needs GPU actors"):
        spec_from_dict({"name": "t", "distill": {"precision": "fp16"}})
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):   # GPU actors CUDA cannot see
        beam_translate(None, None, [], device="cpu", precision="fp16")


def test_killed_actor_restarts_and_its_shard_is_retried(ray_local, run_dir, tmp_path):
    run, src = run_dir
    from orchestrator.stages.distill import make_workers, run_pool
    workers = make_workers(2, run / "teacher" / "model.pt", run / "tokenizer" / "spm.model", tmp_path,
                           DECODE)
    jobs = shard_jobs(run, SHARDS)
    done = []

    def on_done(r):
        done.append(r["index"])
        if len(done) == 1:          # crash both actors once, mid-run (restartable kill)
            for w in workers:
                ray.kill(w, no_restart=False)

    try:
        _, sentences = run_pool(workers, jobs, on_done)
    finally:
        for w in workers:
            ray.kill(w)
    assert sorted(done) == list(range(SHARDS)) and sentences == N_LINES
    bounds = shard_bounds(len(src), SHARDS)
    assert all(shard_done(tmp_path, i, b - a) for i, (a, b) in enumerate(bounds))
    assert [line for i in range(SHARDS) for line in read_shard(tmp_path, i)] == _reference(run, src)[2]


def test_actor_that_cannot_start_is_dropped_and_all_dead_is_an_error(ray_local, run_dir, tmp_path):
    run, src = run_dir
    from orchestrator.stages.distill import make_workers, run_pool
    model, spm = run / "teacher" / "model.pt", run / "tokenizer" / "spm.model"
    jobs = shard_jobs(run, 4)
    bad = make_workers(1, tmp_path / "missing.pt", spm, tmp_path, DECODE)
    good = make_workers(1, model, spm, tmp_path, DECODE)
    try:
        _, sentences = run_pool(bad + good, jobs)
        assert sentences == N_LINES
        with pytest.raises(RuntimeError, match="all distillation actors died"):
            run_pool(make_workers(1, tmp_path / "missing.pt", spm, tmp_path, DECODE), jobs)
    finally:
        for w in bad + good:
            ray.kill(w)


@pytest.mark.timeout(120)
def test_an_actor_the_cluster_cannot_place_does_not_hold_up_the_pool(ray_local, run_dir, tmp_path):
    """More actors than fit: the pool finishes with those that start (it used to wait for ever)."""
    run, src = run_dir
    from orchestrator.stages.distill import make_workers, run_pool
    model, spm = run / "teacher" / "model.pt", run / "tokenizer" / "spm.model"
    jobs = shard_jobs(run, 4)
    workers = make_workers(1, model, spm, tmp_path, DECODE) + make_workers(1, model, spm, tmp_path, DECODE, cpus=64)
    try:
        _, sentences = run_pool(workers, jobs)
    finally:
        for w in workers:
            ray.kill(w)
    assert sentences == N_LINES
    assert all(shard_marker(tmp_path, i)["node"] == ray.get_runtime_context().get_node_id()
               for i in range(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_actors_decode_on_cuda(ray_local, run_dir, tmp_path):
    run, src = run_dir
    from orchestrator.stages.distill import make_workers, run_pool
    workers = make_workers(2, run / "teacher" / "model.pt", run / "tokenizer" / "spm.model", tmp_path,
                           DECODE, cpus=1, gpus=0.5)
    try:
        assert ray.get([w.ready.remote() for w in workers]) == ["cuda", "cuda"]
        jobs = shard_jobs(run, SHARDS)
        _, sentences = run_pool(workers, jobs)
    finally:
        for w in workers:
            ray.kill(w)
    assert sentences == N_LINES
    out = [line for i in range(SHARDS) for line in read_shard(tmp_path, i)]
    ref = _reference(run, src)[2]          # CPU; GPU kernels may round differently at near-ties
    assert len(out) == N_LINES and sum(a == b for a, b in zip(out, ref)) >= 0.95 * N_LINES
