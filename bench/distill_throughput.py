"""Distillation throughput, measured side by side in one run on the same sentences:

  * batched vs per-sentence beam search (in this process, 1 thread): `beam_translate` with a
    huge batch_tokens (all sentences in one batch), with the stage's --batch-tokens, and with
    one sentence per batch (batch_tokens=1);
  * a pool of 1 vs 2 Ray `DistillWorker` actors (1 CPU / 1 thread each), translating the same
    shards through the stage's own dispatch loop (`run_pool`), writing shards as the stage does.

Figures are sentences/s (median over --repeats). Weights are random (seeded): decoding speed
does not depend on the weights once the output length is fixed, and it is: min_len=L,
max_len_a=0, max_len_b=L+1, so every hypothesis of every beam is exactly L tokens + EOS and every
method runs the same number of decoder steps on the same shapes. Sources are synthetic-language
sentences through a SentencePiece model trained on the fly. A benchmark, not a test: the
targets (≥ 1.8× for 2 actors on 2 cores, ≥ 10× for batching) are printed for information.
Run it on an otherwise idle machine: the 1-minute load average is printed before (should be
~0) and after (raised by this run's own actors).

`--run RUN_DIR` measures the same on real data instead: the run's trained teacher and
tokenizer, the first --sentences of its training sources, and natural output lengths (the
stage's defaults: up to 1.5·S + 10 tokens, stopping at EOS). There a batch also pays for its
longest output, which a finished sentence leaving the batch early (beam_search) cuts back.

    python bench/distill_throughput.py                        # tiny model, 256 sentences
    python bench/distill_throughput.py --sentences 512 --json out.json
    python bench/distill_throughput.py --run runs/multi30k    # a trained teacher, real sentences
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imitate_nat import ATDemonstrator  # noqa: E402
from imitate_nat.checkpoint import load_model, save_model  # noqa: E402
from imitate_nat.config import PRESETS, preset  # noqa: E402
from imitate_nat.data import read_lines  # noqa: E402
from imitate_nat.data import source_tensor  # noqa: E402
from imitate_nat.decode import beam_search  # noqa: E402
from imitate_nat.synthetic import generate_corpus  # noqa: E402
from imitate_nat.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from orchestrator.binarize import line_byte_ranges  # noqa: E402
from orchestrator.stages.distill import beam_translate, make_workers, run_pool, shard_bounds  # noqa: E402

TARGETS = {"2 actors / 1 actor": 1.8, "batched / per-sentence": 10.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--out-len", type=int, default=20, help="fixed output tokens per hypothesis (+ EOS)")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--batch-tokens", type=int, default=4096, help="actors' batch_tokens (the stage default)")
    p.add_argument("--shards", type=int, default=8, help="shards for the actor runs")
    p.add_argument("--vocab", type=int, default=2000, help="SentencePiece vocab (upper bound)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="device of the in-process comparison (the actors always run on CPU)")
    p.add_argument("--no-actors", action="store_true", help="skip the 1 vs 2 actors comparison")
    p.add_argument("--run", metavar="RUN_DIR", help="a finished run: its teacher, tokenizer and train sources, "
                                                     "natural output lengths (--size/--out-len/--vocab unused)")
    p.add_argument("--json", metavar="PATH", help="also write all figures as JSON")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    if min(a.sentences, a.out_len, a.beam, a.shards, a.repeats) < 1:
        p.error("sizes and counts must be positive")
    return a


def setup(a, work: Path):
    """(tokenizer, model, sentences, model file, tokenizer file)."""
    if a.run:
        rd = Path(a.run)
        model, _ = load_model(rd / "teacher" / "model.pt", "cpu")
        sents = read_lines(rd / "prepare" / "train.src")[: a.sentences]
        return Tokenizer(rd / "tokenizer" / "spm.model"), model.eval(), sents, rd / "teacher" / "model.pt", rd / "tokenizer" / "spm.model"
    pairs = generate_corpus(max(a.sentences, 2000), seed=a.seed)
    corpus = work / "corpus.txt"
    corpus.write_text("".join(f"{s}\n{t}\n" for s, t in pairs), encoding="utf-8")
    tok = train_sentencepiece([corpus], work / "spm.model", vocab_size=a.vocab)
    torch.manual_seed(a.seed)
    model = ATDemonstrator(preset(a.size, vocab_size=tok.vocab_size, dropout=0.0)).eval()
    save_model(model, work / "model.pt")
    # The premise of the comparison: every hypothesis has exactly out_len tokens.
    kw = {k: v for k, v in decode_kw(a, 0).items() if k != "batch_tokens"}
    hyps = beam_search(model, source_tensor(tok.encode_batch(s for s, _ in pairs[:8])), **kw)
    assert all(len(h) == a.out_len for h in hyps), [len(h) for h in hyps]
    return tok, model, [s for s, _ in pairs[: a.sentences]], work / "model.pt", work / "spm.model"


def decode_kw(a, batch_tokens: int) -> dict:
    if a.run:  # natural lengths: beam_search's defaults, as the stage decodes
        return dict(beam_size=a.beam, batch_tokens=batch_tokens, length_penalty=1.0)
    return dict(beam_size=a.beam, batch_tokens=batch_tokens, length_penalty=1.0,
                max_len_a=0, max_len_b=a.out_len + 1, min_len=a.out_len)


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def in_process(a, tok, model, sents) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one actor with 1 CPU
    model = model.to(a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    try:
        out = {}
        for name, bt in (("batched", 10 ** 9), (f"batched-{a.batch_tokens}", a.batch_tokens),
                         ("per-sentence", 1)):
            kw = decode_kw(a, bt)
            out[name] = len(sents) / timed(
                lambda: (beam_translate(model, tok, sents, device=a.device, **kw), sync()), a.repeats)
        return out
    finally:
        torch.set_num_threads(threads)


def actor_pool(a, work: Path, files: tuple[Path, Path], sents, n_actors: int) -> float:
    src = work / "src.txt"   # actors read their shard's lines from the file, as in the stage
    src.write_text("".join(line + "\n" for line in sents), encoding="utf-8")
    ranges = line_byte_ranges(src, shard_bounds(len(sents), a.shards))
    jobs = [(i, str(src), start, end) for i, (start, end) in enumerate(ranges)]
    shard_dir = work / f"shards-{n_actors}"
    workers = make_workers(n_actors, *files, shard_dir, decode_kw(a, a.batch_tokens), cpus=1)
    try:
        ray.get([w.ready.remote() for w in workers])          # model loading is not timed
        run_pool(workers, jobs[:n_actors])                    # warm-up: one shard per actor
        times = []
        for _ in range(a.repeats):
            seconds, n = run_pool(workers, jobs)
            assert n == len(sents)
            times.append(seconds)
        return len(sents) / statistics.median(times)
    finally:
        for w in workers:
            ray.kill(w)


def main(argv=None) -> dict:
    a = parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as d:
        work = Path(d)
        tok, model, sents, model_file, spm_file = setup(a, work)
        src_tokens = sum(len(s) for s in tok.encode_batch(sents)) / len(sents)
        rates = in_process(a, tok, model, sents)
        if not a.no_actors:
            ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                     object_store_memory=100 * 1024 * 1024, configure_logging=False)
            try:
                for n in (1, 2):
                    rates[f"{n} actor" + ("s" if n > 1 else "")] = actor_pool(a, work, (model_file, spm_file), sents, n)
            finally:
                ray.shutdown()
    load_after = os.getloadavg()
    ratios = {"batched / per-sentence": rates["batched"] / rates["per-sentence"],
              f"batched-{a.batch_tokens} / per-sentence": rates[f"batched-{a.batch_tokens}"] / rates["per-sentence"]}
    if not a.no_actors:
        ratios["2 actors / 1 actor"] = rates["2 actors"] / rates["1 actor"]

    what = (f"teacher of {a.run}, natural output lengths" if a.run else f"--size {a.size}, output {a.out_len} tokens + EOS")
    print(f"# distill throughput: {what}, in-process on {a.device}, {len(sents)} sentences (avg {src_tokens:.1f} source "
          f"tokens), beam {a.beam}, vocab {tok.vocab_size}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}")
    print(f"# load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
          + ("   (CONTENDED before the run: rerun on an idle machine)" if load_before[0] > 1.0 else ""))
    print(f"{'method':<40}{'sentences/s':>12}")
    labels = {"per-sentence": "in-process, 1 sentence per batch", "batched": "in-process, one big batch",
              f"batched-{a.batch_tokens}": f"in-process, batch_tokens={a.batch_tokens}",
              "1 actor": f"1 CPU actor  ({a.shards} shards)", "2 actors": f"2 CPU actors ({a.shards} shards)"}
    for key in [k for k in labels if k in rates]:
        print(f"{labels[key]:<40}{rates[key]:>12.1f}")
    for k, v in ratios.items():
        t = TARGETS.get(k, TARGETS["batched / per-sentence"])
        print(f"{k:<40}{v:>11.2f}x   (target >= {t}x: {'met' if v >= t else 'NOT met'})")

    result = {"args": vars(a), "sentences_per_s": rates, "ratios": ratios, "targets": TARGETS,
              "load_before": load_before, "load_after": load_after, "avg_source_tokens": src_tokens,
              "vocab": tok.vocab_size, "cpus": os.cpu_count(), "torch": torch.__version__,
              "ray": ray.__version__, "python": platform.python_version()}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
