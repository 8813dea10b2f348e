"""The binarized data path: the tokenizer stage's .bin/.idx hold the tokenizer's ids for every
line (Ray tasks, several chunks), the training plan from the memory-mapped lengths equals the
in-memory path's, workers get disjoint batches, and opening the data costs a rank almost no
memory."""
import json
import subprocess
import sys

import numpy as np
import torch

from imitate_nat.data import read_lines, token_batches
from imitate_nat.indexed import IndexedDataset, IndexedWriter, collate, write_batch_plan
from imitate_nat.tokenizer import Tokenizer
from orchestrator.binarize import binarize, binarize_files
from orchestrator.run.files import sha256_file
from orchestrator.run.layout import bin_prefix, spm_path, split_path
from orchestrator.run.manifest import read_manifest
from orchestrator.stages.train_worker import TrainData, batch_stream

from helpers import ROOT


def test_binarized_train_set_holds_the_tokenizers_ids_for_every_line(ray_local, prepared_run, tmp_path):
    run_dir, _ = prepared_run
    tok = Tokenizer(spm_path(run_dir))
    for side in ("src", "tgt"):
        lines = read_lines(split_path(run_dir, "train", side))
        ds = IndexedDataset(bin_prefix(run_dir, "tokenizer", f"train.{side}"))
        assert len(ds) == len(lines)
        assert [ds[i].tolist() for i in range(len(ds))] == tok.encode_batch(lines)
        # in 7 chunks, empty lines included: the same bytes as the stage's single pass
        text = tmp_path / f"{side}.txt"
        text.write_text("\n".join(lines[:50] + ["", "  "] + lines[50:100]) + "\n", encoding="utf-8")
        assert binarize(text, spm_path(run_dir), tmp_path / side, chunk_lines=15) == 102
        part = IndexedDataset(tmp_path / side)
        assert [part[i].tolist() for i in range(102)] == tok.encode_batch(read_lines(text))
        assert not list(tmp_path.glob(f"{side}.part*"))         # the chunks are merged and gone
    # both sides queued at once: the same bytes as one file at a time
    texts = [tmp_path / f"{side}.txt" for side in ("src", "tgt")]
    assert binarize_files([(t, tmp_path / f"both.{t.stem}") for t in texts], spm_path(run_dir), chunk_lines=15) == \
        [102, 102]
    for t in texts:
        for ext in ("bin", "idx"):
            assert (tmp_path / f"both.{t.stem}.{ext}").read_bytes() == (tmp_path / f"{t.stem}.{ext}").read_bytes()


def test_manifests_record_the_binarized_files_with_checksums(micro_run):
    run_dir, _ = micro_run
    for stage, names in (("tokenizer", ("train.src", "train.tgt")), ("distill", ("train.distilled.tgt",))):
        outputs = read_manifest(run_dir / stage).outputs
        for name in names:
            for suffix in (".bin", ".idx"):
                assert outputs[name + suffix]["sha256"] == sha256_file(run_dir / stage / (name + suffix))
    # the distilled targets binarized line for line (the student trains on these)
    lines = read_lines(run_dir / "distill" / "train.distilled.tgt")
    ds = IndexedDataset(bin_prefix(run_dir, "distill", "train.distilled.tgt"))
    assert [ds[i].tolist() for i in range(len(ds))] == Tokenizer(spm_path(run_dir)).encode_batch(lines)


def old_path_batches(run_dir, max_len, batch_tokens, seed, epoch):
    """What training did before the data was binarized: tokenize both files into lists, filter,
    and cut token_batches over the filtered pairs (indices into the filtered list)."""
    tok = Tokenizer(spm_path(run_dir))
    src = tok.encode_batch(read_lines(split_path(run_dir, "train", "src")))
    tgt = tok.encode_batch(read_lines(split_path(run_dir, "train", "tgt")))
    keep = [i for i in range(len(src)) if 0 < len(src[i]) < max_len and 0 < len(tgt[i]) < max_len]
    lengths = [max(len(src[i]), len(tgt[i])) + 1 for i in keep]
    return keep, token_batches(lengths, batch_tokens, shuffle=True, seed=seed * 1000 + epoch)


def train_data(run_dir, plan_dir, max_len, batch_tokens) -> TrainData:
    """The worker's view of the tokenizer stage's pairs, planned as the training stage plans it."""
    src, tgt = bin_prefix(run_dir, "tokenizer", "train.src"), bin_prefix(run_dir, "tokenizer", "train.tgt")
    write_batch_plan(src, tgt, max_len, batch_tokens, plan_dir / "plan")
    return TrainData(src, tgt, plan_dir / "plan")


def test_one_worker_takes_the_batches_of_the_in_memory_path_epoch_after_epoch(prepared_run, tmp_path):
    run_dir, _ = prepared_run
    data = train_data(run_dir, tmp_path, 64, 300)
    stream = batch_stream(data, seed=3, start_step=0, rank=0, world=1)
    for epoch in range(2):
        keep, expected = old_path_batches(run_dir, 64, 300, 3, epoch)
        assert sorted(data.plan.pairs.tolist()) == keep and len(data) == len(keep)
        for batch in expected:
            step, micro, tokens, step_tokens = next(stream)
            [b] = micro
            want = collate(data.src, data.tgt, [keep[i] for i in batch])
            assert torch.equal(b.src, want.src) and torch.equal(b.tgt_out, want.tgt_out)
            assert tokens == [step_tokens] == [int(want.tgt_out.ne(0).sum())]
    # resuming at a step gives what the uninterrupted stream gives from there
    again = batch_stream(data, seed=3, start_step=len(expected) + 2, rank=0, world=1)
    stream = batch_stream(data, seed=3, start_step=0, rank=0, world=1)
    for _ in range(len(expected) + 2):
        next(stream)
    for _ in range(5):
        a, b = next(stream), next(again)
        assert a[0] == b[0] and a[2:] == b[2:] and all((x.src == y.src).all() for x, y in zip(a[1], b[1]))


def test_workers_take_disjoint_whole_batches_and_a_step_counts_every_workers_tokens(prepared_run, tmp_path):
    run_dir, _ = prepared_run
    world, update_freq = 2, 2
    data = train_data(run_dir, tmp_path, 64, 200)
    n_batches = len(data.plan)
    steps = n_batches // (world * update_freq)
    seen = []
    streams = [batch_stream(data, 1, 0, rank, world, update_freq) for rank in range(world)]
    for _ in range(steps):   # one epoch
        outs = [next(s) for s in streams]
        assert len({o[0] for o in outs}) == 1 and len({o[3] for o in outs}) == 1     # same step, same total
        assert sum(sum(o[2]) for o in outs) == outs[0][3]       # the step's tokens: every worker's micro-batches
        for o in outs:
            assert len(o[1]) == update_freq
            for b in o[1]:
                # a batch's rows, as (source, target) byte strings, identify its pairs
                seen.append(frozenset((bytes(s.numpy()), bytes(t.numpy())) for s, t in zip(b.src, b.tgt)))
    pairs = [p for b in seen for p in b]
    assert len(pairs) == len(set(pairs))                        # disjoint
    assert n_batches - len(seen) < world * update_freq          # all but what cannot fill a step


MEMORY_PROBE = """
import json, sys
from orchestrator.stages.train_worker import TrainData, batch_stream

def rss():  # resident MB: all of it, and its private (anonymous) part
    rows = dict(line.split(":") for line in open("/proc/self/status"))
    return [int(rows[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon")]
before = rss()
data = TrainData(sys.argv[1], sys.argv[2], sys.argv[3])
stream = batch_stream(data, 1, 0, 0, 2, 2)
opened = rss()
for _ in range(20):
    next(stream)
after = rss()
print(json.dumps({"pairs": len(data), "open": opened[0] - before[0], "anon": after[1] - before[1]}))
"""


def test_a_rank_opening_200k_pairs_grows_by_little(tmp_path):
    """Binarized, planned once by the stage and memory-mapped, a rank holds 16 bytes a batch:
    opening 200k pairs of ~30 tokens costs it well under 4 MB (the token-list path took ~140 MB
    for this corpus, per-rank length arrays and plans ~6 MB), and 20 steps add no private
    memory: what they add is the file pages of the batches taken, which the kernel can drop."""
    rng = np.random.default_rng(0)
    for side in ("src", "tgt"):
        with IndexedWriter(tmp_path / side, 32000) as w:
            for n in rng.integers(10, 50, 200_000):
                w.add(rng.integers(4, 32000, n))
    meta = write_batch_plan(tmp_path / "src", tmp_path / "tgt", 256, 4096, tmp_path / "plan")
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *(str(tmp_path / n) for n in ("src", "tgt", "plan"))],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    print(result, meta["batches"])
    assert result["pairs"] == meta["pairs"] == 200_000
    assert result["open"] < 4 and result["anon"] < 4
