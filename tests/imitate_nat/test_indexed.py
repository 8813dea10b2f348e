"""Binarized memory-mapped datasets (imitate_nat.indexed): format round trip, atomic writes,
merging, batch planning equal to data.token_batches, rank split, collate equal to make_batch,
and a bound on the memory a rank needs to open and batch a corpus."""
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from imitate_nat.data import make_batch, token_batches
from imitate_nat.indexed import (HEADER_SIZE, BatchPlan, IndexedDataset, IndexedWriter, collate, filter_lengths,
                                 merge_indexed, pair_lengths, plan_batches, rank_batches, write_batch_plan)


def random_corpus(rng, n, vocab, max_len=12, empty_every=5):
    seqs = [rng.integers(0, vocab, size=rng.integers(1, max_len)).tolist() for _ in range(n)]
    for i in range(0, n, empty_every):
        seqs[i] = []
    return seqs


def write(prefix, seqs, vocab):
    with IndexedWriter(prefix, vocab) as w:
        w.add_many(seqs)
    return IndexedDataset(prefix)


@pytest.mark.parametrize("vocab,dtype,top", [(65536, np.uint16, 65535), (70000, np.uint32, 69999),
                                             (400, np.uint16, 399)])
def test_round_trip(tmp_path, vocab, dtype, top):
    rng = np.random.default_rng(0)
    seqs = random_corpus(rng, 300, vocab)
    seqs[1] = [top, 0, top - 1]
    seqs.append([top] * 3)
    ds = write(tmp_path / "c", seqs, vocab)
    assert ds.dtype == dtype and len(ds) == len(seqs)
    assert ds.num_tokens == sum(map(len, seqs))
    assert [ds[i].tolist() for i in range(len(ds))] == seqs
    assert ds[-1].tolist() == seqs[-1] and ds[np.int64(1)].tolist() == seqs[1]
    assert ds.lengths.tolist() == [len(s) for s in seqs]
    assert os.path.getsize(tmp_path / "c.bin") == ds.num_tokens * np.dtype(dtype).itemsize
    assert os.path.getsize(tmp_path / "c.idx") == HEADER_SIZE + 8 * (len(seqs) + 1)
    assert isinstance(ds[1], np.ndarray) and not ds[1].flags.writeable  # a view of the read-only map
    with pytest.raises(IndexError):
        ds[len(seqs)]
    again = pickle.loads(pickle.dumps(ds))
    assert again.prefix == ds.prefix and again[1].tolist() == seqs[1]
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "c.idx"]  # no temporaries left


def test_numpy_input_and_empty_dataset(tmp_path):
    with IndexedWriter(tmp_path / "a", 1000) as w:
        assert w.add(np.array([5, 6, 7], dtype=np.int32)) == 0
        assert w.add(np.array([], dtype=np.int64)) == 1
        assert w.add(np.array([999], dtype=np.uint16)) == 2
    ds = IndexedDataset(tmp_path / "a")
    assert [ds[i].tolist() for i in range(3)] == [[5, 6, 7], [], [999]]
    empty = write(tmp_path / "e", [], 1000)
    assert len(empty) == 0 and empty.num_tokens == 0 and empty.lengths.tolist() == []
    only_empty = write(tmp_path / "z", [[], []], 1000)
    assert [only_empty[i].tolist() for i in range(2)] == [[], []]


def test_bad_ids_and_mismatched_files(tmp_path):
    for bad in ([1, 1000], [-1], [0.5]):
        for many in (False, True):
            with pytest.raises((ValueError, TypeError)):
                with IndexedWriter(tmp_path / "b", 1000) as w:
                    w.add([1, 2])
                    w.add_many([[3], bad]) if many else w.add(bad)
            assert os.listdir(tmp_path) == []
    write(tmp_path / "c", [[1, 2, 3]], 1000)
    with open(tmp_path / "c.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="index expects"):
        IndexedDataset(tmp_path / "c")
    (tmp_path / "d.idx").write_bytes(b"not an index file at all")
    with pytest.raises(ValueError, match="not an index"):
        IndexedDataset(tmp_path / "d")


def test_add_many_writes_the_bytes_add_writes(tmp_path):
    rng = np.random.default_rng(2)
    seqs = random_corpus(rng, 500, 70000) + [np.array([3, 69999], dtype=np.uint32), []]
    with IndexedWriter(tmp_path / "one", 70000) as w:
        for s in seqs:
            w.add(s)
    with IndexedWriter(tmp_path / "many", 70000) as w:
        w.add_many(seqs[:7])
        w.add_many([])
        w.add_many(iter(seqs[7:]))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"one.{ext}").read_bytes() == (tmp_path / f"many.{ext}").read_bytes()


def test_atomic_write(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedWriter(tmp_path / "p", 100) as w:
            w.add_many([[1, 2], [3]] * 1000)
            raise RuntimeError("worker died")
    assert os.listdir(tmp_path) == []
    # An existing dataset is kept whole when its rewrite fails.
    write(tmp_path / "p", [[7, 8]], 100)
    with pytest.raises(RuntimeError):
        with IndexedWriter(tmp_path / "p", 100) as w:
            w.add([1])
            raise RuntimeError
    assert IndexedDataset(tmp_path / "p")[0].tolist() == [7, 8]
    assert sorted(os.listdir(tmp_path)) == ["p.bin", "p.idx"]


def test_merge_equals_single_write(tmp_path):
    rng = np.random.default_rng(1)
    seqs = random_corpus(rng, 500, 32000)
    chunks = [seqs[:0], seqs[:123], seqs[123:124], seqs[124:400], seqs[400:]]
    parts = [str(write(tmp_path / f"part{k}", c, 32000).prefix) for k, c in enumerate(chunks)]
    merge_indexed(parts, tmp_path / "merged")
    write(tmp_path / "whole", seqs, 32000)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"merged.{ext}").read_bytes() == (tmp_path / f"whole.{ext}").read_bytes()
    merged = IndexedDataset(tmp_path / "merged")
    assert [merged[i].tolist() for i in range(len(merged))] == seqs
    write(tmp_path / "wide", [[70000]], 80000)
    with pytest.raises(ValueError, match="dtype"):
        merge_indexed(parts + [str(tmp_path / "wide")], tmp_path / "bad")
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.idx").exists()
    with pytest.raises(ValueError):
        merge_indexed([], tmp_path / "none")


@pytest.mark.parametrize("n", [0, 1, 2, 17, 300, 3000])
@pytest.mark.parametrize("max_tokens", [0, 1, 7, 64, 1000, 10 ** 9])
def test_plan_batches_equals_token_batches(n, max_tokens):
    rng = np.random.default_rng(n * 7 + max_tokens % 1000)
    lengths = rng.integers(0, 80, size=n)
    lengths[rng.random(n) < 0.1] = 0                     # empty sentences
    lengths[rng.random(n) < 0.05] = max_tokens + 5       # longer than max_tokens
    for max_sentences in (None, 0, 1, 3, 50):
        for shuffle, seed in ((False, 0), (True, 0), (True, 12345)):
            ref = token_batches(lengths.tolist(), max_tokens, shuffle=shuffle, seed=seed,
                                max_sentences=max_sentences)
            got = plan_batches(lengths, max_tokens, shuffle=shuffle, seed=seed, max_sentences=max_sentences)
            assert [b.tolist() for b in got] == ref, (max_sentences, shuffle, seed)


def test_plan_batches_training_lengths():
    # the lengths training uses: pair lengths (max + 1) of a filtered corpus, 1 batch per epoch seed
    rng = np.random.default_rng(3)
    src, tgt = rng.integers(0, 120, size=20000), rng.integers(0, 120, size=20000)
    keep = filter_lengths(src, tgt, 100)
    assert keep.tolist() == [i for i in range(len(src)) if 0 < src[i] < 100 and 0 < tgt[i] < 100]
    lengths = pair_lengths(src[keep], tgt[keep])
    assert lengths.tolist() == [max(int(s), int(t)) + 1 for s, t in zip(src[keep], tgt[keep])]
    for seed in (0, 1001):
        got = plan_batches(lengths, 4096, shuffle=True, seed=seed)
        assert [b.tolist() for b in got] == token_batches(lengths.tolist(), 4096, shuffle=True, seed=seed)


def test_written_plan_is_the_plan_of_the_kept_pairs_and_is_kept_until_its_inputs_change(tmp_path):
    rng = np.random.default_rng(8)
    srcs, tgts = random_corpus(rng, 500, 1000, max_len=30), random_corpus(rng, 500, 1000, max_len=30, empty_every=7)
    src, tgt = write(tmp_path / "s", srcs, 1000), write(tmp_path / "t", tgts, 1000)
    meta = write_batch_plan(src.prefix, tgt.prefix, 20, 120, tmp_path / "plan")
    keep = filter_lengths(src.lengths, tgt.lengths, 20)
    want = [keep[b] for b in plan_batches(pair_lengths(src.lengths[keep], tgt.lengths[keep]), 120)]
    plan = BatchPlan(tmp_path / "plan")
    assert len(plan) == meta["batches"] == len(want) and plan.num_pairs == meta["pairs"] == len(keep) > 0
    assert [plan[k].tolist() for k in range(len(plan))] == [b.tolist() for b in want]
    assert plan.tokens.tolist() == [sum(len(tgts[i]) + 1 for i in b) for b in want]   # + EOS
    assert isinstance(plan.pairs, np.memmap) and pickle.loads(pickle.dumps(plan))[3].tolist() == want[3].tolist()
    assert sorted(p.name for p in tmp_path.glob("plan*")) == ["plan.batches.npy", "plan.json", "plan.pairs.npy"]

    stamp = (tmp_path / "plan.pairs.npy").stat().st_mtime_ns
    assert write_batch_plan(src.prefix, tgt.prefix, 20, 120, tmp_path / "plan") == meta     # same inputs: kept
    assert (tmp_path / "plan.pairs.npy").stat().st_mtime_ns == stamp
    assert write_batch_plan(src.prefix, tgt.prefix, 20, 200, tmp_path / "plan")["batches"] < len(want)
    short = write(tmp_path / "t", [t[:3] for t in tgts], 1000)          # the targets rewritten: planned again
    again = write_batch_plan(src.prefix, tgt.prefix, 20, 120, tmp_path / "plan")
    keep = filter_lengths(src.lengths, short.lengths, 20)
    assert again["pairs"] == len(keep) and again != meta
    assert BatchPlan(tmp_path / "plan").tokens.sum() == sum(min(len(tgts[i]), 3) + 1 for i in keep)

    (tmp_path / "plan.json").write_text((tmp_path / "plan.json").read_text().replace('"batches": ', '"batches": 1'))
    with pytest.raises(ValueError, match="do not match"):
        BatchPlan(tmp_path / "plan")
    write(tmp_path / "e1", [], 1000), write(tmp_path / "e2", [], 1000)
    assert write_batch_plan(tmp_path / "e1", tmp_path / "e2", 20, 120, tmp_path / "empty")["pairs"] == 0
    assert len(BatchPlan(tmp_path / "empty")) == 0
    with pytest.raises(ValueError, match="holds 500 sentences"):
        write_batch_plan(src.prefix, tmp_path / "e2", 20, 120, tmp_path / "bad")


@pytest.mark.parametrize("n_batches,world", [(0, 1), (1, 2), (10, 1), (10, 3), (11, 4), (12, 4), (3, 8)])
def test_rank_batches(n_batches, world):
    batches = [np.array([b * 10, b * 10 + 1]) for b in range(n_batches)]
    per_rank = [rank_batches(batches, r, world) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1
    seen = [int(b[0]) for p in per_rank for b in p]
    assert len(seen) == len(set(seen))                  # disjoint
    assert n_batches - len(seen) < world                 # covers all but the remainder
    assert set(seen) == {b * 10 for b in range(len(per_rank[0]) * world)}
    with pytest.raises(ValueError):
        rank_batches(batches, world, world)


def test_collate_equals_make_batch(tmp_path):
    rng = np.random.default_rng(4)
    srcs = random_corpus(rng, 200, 70000, max_len=20)
    tgts = [s or [5] for s in random_corpus(rng, 200, 70000, max_len=20, empty_every=7)]
    tgts[3] = []
    src, tgt = write(tmp_path / "s", srcs, 70000), write(tmp_path / "t", tgts, 70000)
    cases = [[0], [1, 2, 5], list(range(4, 60)), [7, 0, 10], []] + \
        [b for b in plan_batches(pair_lengths(src.lengths, tgt.lengths), 100) if 3 not in b][:20]
    for idx in cases:
        got = collate(src, tgt, idx)
        ref = make_batch([srcs[i] for i in idx], [tgts[i] for i in idx])
        for name in ("src", "tgt", "tgt_in", "tgt_out"):
            a, b = getattr(got, name), getattr(ref, name)
            assert a.dtype == b.dtype == torch.long and torch.equal(a, b), (idx, name)
    with pytest.raises(ValueError, match="empty target"):
        collate(src, tgt, [2, 3])


MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, torch
    from imitate_nat.indexed import IndexedDataset, collate, filter_lengths, pair_lengths, plan_batches

    from imitate_nat.data import make_batch

    def rss_mb():  # VmRSS and its private (anonymous) part, in MB
        rows = dict(line.split(":") for line in open("/proc/self/status"))
        return [int(rows[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon")]

    make_batch([[4]], [[5]])  # torch's first-use setup is not the dataset's cost
    before = rss_mb()
    src, tgt = IndexedDataset(sys.argv[1] + "/src"), IndexedDataset(sys.argv[1] + "/tgt")
    keep = filter_lengths(src.lengths, tgt.lengths, 256)
    batches = plan_batches(pair_lengths(src.lengths[keep], tgt.lengths[keep]), 4096, shuffle=True, seed=3)
    tokens = sum(int(collate(src, tgt, keep[b]).tgt_out.ne(0).sum()) for b in batches[:20])
    after = rss_mb()
    print(len(src), len(batches), tokens, *(round(a - b, 1) for a, b in zip(after, before)))
""")


def test_memory_stays_small(tmp_path):
    n = 200_000
    rng = np.random.default_rng(5)
    for side in ("src", "tgt"):
        lengths = rng.integers(20, 41, size=n)
        ends = np.cumsum(lengths)
        tokens = rng.integers(4, 32000, size=int(ends[-1])).astype(np.uint16)
        with IndexedWriter(tmp_path / side, 32000) as w:
            for lo, hi in zip(ends - lengths, ends):
                w.add(tokens[lo:hi])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    sentences, n_batches, tokens, growth_mb, anon_mb = out.stdout.split()
    # File-backed pages of the touched .bin count in VmRSS (shared, reclaimable page cache).
    print(f"\nRSS growth opening + planning {sentences} pairs ({n_batches} batches) and collating 20: "
          f"{growth_mb} MB (private {anon_mb} MB)")
    assert int(sentences) == n and int(tokens) > 0
    assert float(growth_mb) < 40 and float(anon_mb) < 20
