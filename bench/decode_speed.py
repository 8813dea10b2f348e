"""Decoding speed, measured side by side in one run: AT beam-4 and greedy (KV cache), NAT one
pass, NAT+LPD(ΔT), and peers at the same dimensions (bench/peers.py): Hugging Face MarianMT
(beam 4) and CTranslate2 (the same Marian model converted; fp32 and int8, beam 4 and greedy).
On a CPU, AT beam-4, NAT and NAT+LPD also run on the CPU inference path (imitate_nat/cpu.py:
int8, and bf16 where the CPU has bf16 matrix units). On CUDA, NAT and NAT+LPD also run as CUDA
graphs (imitate_nat/graphs.py; the AT and the peers stay eager), and the graphs' outputs are
compared with the eager ones.

Random weights (seeded); every method sees the same random sources and decodes exactly
--tgt-len tokens (+ EOS for the autoregressive ones; LPD: its 2ΔT+1 candidate lengths around it),
so only the decoding algorithm differs.
Figures are ms/sentence (median over --repeats timed measurements of --sentences sentences,
after --warmup untimed calls) and speedups over our AT beam-4. A benchmark, not a test:
the paper's targets (GPU, batch 1) are printed for information only.

    python bench/decode_speed.py --threads 2         # base size, CPU-feasible defaults
    python bench/decode_speed.py --device cuda --dtype bf16 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imitate_nat.at import ATDemonstrator  # noqa: E402
from imitate_nat.config import PRESETS, preset  # noqa: E402
from imitate_nat.cpu import CPU_MODES, for_cpu, has_bf16_matrix_units  # noqa: E402
from imitate_nat.decode import beam_search, greedy_search, lpd_decode, nat_decode  # noqa: E402
from imitate_nat.graphs import GraphedLPD  # noqa: E402
from imitate_nat.nat import NATLearner  # noqa: E402
from peers import build_ct2, build_marian  # noqa: E402  (bench/ is the script's directory)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PAPER_TARGETS = {"NAT": 18.6, "NAT+LPD": 9.7}  # Wei et al. 2019, WMT14 En-De, GPU, batch 1
BASELINE = "AT beam-4"
CT2_PEER = "CT2 int8 beam-4"   # the optimized autoregressive peer the CPU targets compare with
MARIAN = "Marian beam-4 (HF)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base", choices=sorted(PRESETS))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--n-actions", type=int, default=512)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch-sizes", default="1,64", help="comma-separated (default 1,64)")
    p.add_argument("--src-len", type=int, default=25, help="source tokens per sentence (+ EOS)")
    p.add_argument("--tgt-len", type=int, default=25, help="output tokens per sentence (fixed)")
    p.add_argument("--delta-t", type=int, default=3, help="LPD ΔT: 2ΔT+1 candidate lengths")
    p.add_argument("--sentences", type=int, default=None, help="sentences per timed measurement, rounded up "
                   "to a multiple of the batch size (default: cuda 64, cpu 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed measurements per method, interleaved "
                   "across methods; the median is reported (default: cuda 5, cpu 3)")
    p.add_argument("--budget-s", type=float, default=None, help="per batch size: no new round of repeats once "
                   "this many seconds are spent, at least one is always run (default: cuda none, cpu 60)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per method and batch size; on CPU "
                   "they use one sentence, as CPU kernels need no per-shape warm-up (default: cuda 2, cpu 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's); on a CPU "
                   "shared with other jobs, 1 gives far steadier figures")
    p.add_argument("--no-peer", action="store_true", help="skip the MarianMT and CTranslate2 peers")
    p.add_argument("--cpu-modes", default=None, help="on a CPU: comma-separated modes of the CPU inference path "
                   "to time beside fp32 (int8, bf16; none: no such rows; default: int8, plus bf16 where the "
                   "CPU has bf16 matrix units)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA, skip the CUDA-graph NAT and LPD rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write all figures as JSON")
    a = p.parse_args(argv)
    a.batch_sizes = [int(b) for b in a.batch_sizes.split(",") if b.strip()]
    if a.cpu_modes is None:
        a.cpu_modes = "int8,bf16" if has_bf16_matrix_units() else "int8"
    a.cpu_modes = [] if a.device == "cuda" or a.cpu_modes == "none" else [m for m in a.cpu_modes.split(",") if m]
    if set(a.cpu_modes) - set(CPU_MODES[1:3]):
        p.error(f"--cpu-modes: choose from {', '.join(CPU_MODES[1:3])} or none, got {','.join(a.cpu_modes)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    if a.dtype != "fp32" and a.device != "cuda":
        p.error(f"--dtype {a.dtype} is only supported with --device cuda")
    # CPU defaults keep the base-size run near 3 minutes on 2 cores: one batch-64 round of all
    # methods takes ~80 s there (NAT+LPD and Marian beam-4 ~30-40 s each), so it runs once.
    cuda = a.device == "cuda"
    a.sentences = a.sentences or (64 if cuda else 1)
    a.repeats = a.repeats or (5 if cuda else 3)
    a.budget_s = (None if cuda else 60.0) if a.budget_s is None else a.budget_s
    a.warmup = (2 if cuda else 1) if a.warmup is None else a.warmup
    if min(a.batch_sizes) < 1 or a.src_len < 1 or a.tgt_len < 1 or a.repeats < 1 or a.warmup < 0 or a.delta_t < 0:
        p.error("batch sizes, lengths and repeats must be positive; warmup and delta-t >= 0")
    return a


def build_models(a):
    torch.manual_seed(a.seed)
    cfg = preset(a.size, vocab_size=a.vocab, n_actions=a.n_actions)
    at = ATDemonstrator(cfg)
    nat = NATLearner(cfg)
    nat.init_from_at(at)  # as in the paper: the NAT starts from the AT's parameters
    dtype = DTYPES[a.dtype]
    return cfg, at.to(a.device, dtype).eval(), nat.to(a.device, dtype).eval()


def build_peers(cfg, a) -> tuple[dict, dict]:
    """({row name: fn(src)}, {peer: why it was skipped}) for MarianMT and CTranslate2."""
    if a.no_peer:
        return {}, {"MarianMT": "--no-peer", "CTranslate2": "--no-peer"}
    rows, skipped = {}, {}
    marian, skipped["MarianMT"] = build_marian(cfg, a, DTYPES[a.dtype])
    if marian:
        rows[MARIAN] = marian
    ct2, skipped["CTranslate2"] = build_ct2(cfg, a)
    rows.update(ct2 or {})
    return rows, {k: v for k, v in skipped.items() if v}


def methods(at, nat, peers: dict, a):
    """name -> fn(src) returning the mean output length (tokens, excluding EOS)."""
    T, L = a.tgt_len, dict(max_len_a=0, max_len_b=a.tgt_len + 1, min_len=a.tgt_len)
    full = lambda src: torch.full((src.size(0),), T, dtype=torch.long, device=src.device)  # noqa: E731
    mean_len = lambda hyps: sum(map(len, hyps)) / len(hyps)  # noqa: E731
    out = {
        BASELINE: lambda src: mean_len(beam_search(at, src, beam_size=4, **L)),
        "AT greedy": lambda src: mean_len(greedy_search(at, src, **L)),
        "NAT": lambda src: mean_len(nat_decode(nat, src, lengths=full(src))),
        f"NAT+LPD(dT={a.delta_t})": lambda src: mean_len(lpd_decode(nat, at, src, delta_t=a.delta_t,
                                                                     lengths=full(src))),
    }
    for mode in a.cpu_modes:   # the CPU inference path: the same models in int8 / bf16
        fast_at, fast_nat = for_cpu(at, mode), for_cpu(nat, mode)
        out[f"{BASELINE} cpu-{mode}"] = lambda src, m=fast_at: mean_len(beam_search(m, src, beam_size=4, **L))
        out[f"NAT cpu-{mode}"] = lambda src, m=fast_nat: mean_len(nat_decode(m, src, lengths=full(src)))
        out[f"NAT+LPD(dT={a.delta_t}) cpu-{mode}"] = lambda src, m=fast_nat, t=fast_at: mean_len(
            lpd_decode(m, t, src, delta_t=a.delta_t, lengths=full(src)))
    if a.device == "cuda" and not a.no_cuda_graphs:
        biggest = max(a.batch_sizes)
        nat_graph = GraphedLPD(nat, at, delta_t=0, max_batch=biggest)
        lpd_graph = GraphedLPD(nat, at, delta_t=a.delta_t, max_batch=biggest)
        out["NAT graph"] = lambda src: mean_len(nat_graph(src, full(src)))
        out[f"NAT+LPD(dT={a.delta_t}) graph"] = lambda src: mean_len(lpd_graph(src, full(src)))
    return {**out, **peers}


def graph_agreement(at, nat, srcs: list[torch.Tensor], a) -> dict:
    """Share of sentences whose CUDA-graph output equals eager decoding's, for NAT and LPD."""
    out = {}
    for name, dt in (("NAT", 0), (f"NAT+LPD(dT={a.delta_t})", a.delta_t)):
        graphed = GraphedLPD(nat, at, delta_t=dt, max_batch=max(a.batch_sizes))
        same = total = 0
        for src in srcs:
            lengths = torch.full((src.size(0),), a.tgt_len, dtype=torch.long, device=src.device)
            g, e = graphed(src, lengths), lpd_decode(nat, at, src, delta_t=dt, lengths=lengths)
            same, total = same + sum(x == y for x, y in zip(g, e)), total + len(e)
        out[name] = same / total
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_methods(fns: dict, srcs: list[torch.Tensor], a) -> dict:
    """name -> (median ms/sentence, mean output length, samples). Repeats are interleaved across
    methods so that a drifting machine load (shared CPUs, GPU clocks) hits all methods alike."""
    warm = srcs[0] if a.device == "cuda" else srcs[0][:1]
    length = {name: fn(warm) for name, fn in fns.items() for _ in range(a.warmup)}
    per_sent = {name: [] for name in fns}
    n_sent, start = sum(s.size(0) for s in srcs), time.perf_counter()
    for _ in range(a.repeats):
        if per_sent[BASELINE] and a.budget_s is not None and time.perf_counter() - start > a.budget_s:
            break
        for name, fn in fns.items():
            sync(a.device)
            t0 = time.perf_counter()
            for src in srcs:
                length[name] = fn(src)
            sync(a.device)
            per_sent[name].append((time.perf_counter() - t0) * 1000 / n_sent)
    return {name: (statistics.median(v), length[name], v) for name, v in per_sent.items()}


def machine_info(a) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": a.device, "dtype": a.dtype, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "loadavg_1m_at_start": os.getloadavg()[0]}
    if a.device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    for package in ("transformers", "ctranslate2"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def ct2_reference(rows: dict) -> str | None:
    """The CT2 int8 beam-4 row the targets compare with: its fastest thread count."""
    names = [n for n in rows if n.startswith(CT2_PEER)]
    return min(names, key=lambda n: rows[n]["ms_per_sentence"]) if names else None


def print_table(bs: int, rows: dict, a, n_sent: int) -> None:
    n_rep = len(rows[BASELINE]["samples_ms"])
    print(f"\nbatch size {bs}: {n_sent} sentences per measurement, median of {n_rep} repeat(s)")
    ref = ct2_reference(rows)
    ct2 = rows.get(ref)
    vs_ct2 = f"{'vs ' + CT2_PEER + ' best':>24}" if ct2 else ""
    print(f"  {'method':<30}{'ms/sent':>11}{'speedup':>10}{'out len':>9}{vs_ct2}   paper target (GPU, batch 1)")
    for name, r in rows.items():
        note = ""
        key = "NAT+LPD" if name.startswith("NAT+LPD") else "NAT" if name.startswith("NAT") else name
        if bs == 1 and key in PAPER_TARGETS:
            tgt = PAPER_TARGETS[key]
            verdict = ("PASS" if r["speedup"] >= tgt else "MISS") if a.device == "cuda" else "n/a on CPU"
            note = f">= {tgt}x  {verdict}"
        ratio = f"{ct2['ms_per_sentence'] / r['ms_per_sentence']:>23.2f}x" if ct2 else ""
        print(f"  {name:<30}{r['ms_per_sentence']:>11.2f}{r['speedup']:>9.2f}x{r['mean_out_len']:>9.1f}{ratio}   {note}")
    if ct2:
        print(f"  (vs {ref}, the faster {CT2_PEER}: its ms / the row's ms; > 1 means the row is faster)")
    peer = rows.get(MARIAN)
    if peer:
        ratio = peer["ms_per_sentence"] / rows[BASELINE]["ms_per_sentence"]
        print(f"  ours beam-4 vs Marian beam-4: {ratio:.2f}x (Marian ms / our ms; >= 1 means ours is at least as fast)")


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg, at, nat = build_models(a)
    peers, skipped = build_peers(cfg, a)
    fns = methods(at, nat, peers, a)
    info = machine_info(a)
    print(f"decode speed: size={a.size} (d={cfg.d_model}, {cfg.enc_layers}+{cfg.dec_layers} layers, "
          f"{cfg.n_heads} heads, ffn {cfg.d_ffn}), vocab={cfg.vocab_size}, actions={cfg.n_actions}, "
          f"device={info.get('device_name', a.device)}, dtype={a.dtype}, threads={info['threads']}, "
          f"torch {info['torch']}")
    budget = "" if a.budget_s is None else f", no new round after {a.budget_s:g} s"
    print(f"src_len={a.src_len}+EOS, tgt_len={a.tgt_len}, dT={a.delta_t}, repeats={a.repeats} (median{budget}), "
          f"warmup={a.warmup} calls{'' if a.device == 'cuda' else ' of 1 sentence'}, "
          f"sentences/measurement >= {a.sentences} (rounded up to the batch size)")
    for peer, why in skipped.items():
        print(f"note: {peer} peer skipped: {why}")
    gen = torch.Generator().manual_seed(a.seed + 1)
    results = {}
    for bs in a.batch_sizes:
        n_batches = -(-a.sentences // bs)
        srcs = [torch.cat([torch.randint(4, cfg.vocab_size, (bs, a.src_len), generator=gen),
                           torch.full((bs, 1), cfg.eos_id)], 1).to(a.device) for _ in range(n_batches)]
        t0 = time.perf_counter()
        rows = {name: {"ms_per_sentence": ms, "mean_out_len": length, "samples_ms": samples}
                for name, (ms, length, samples) in time_methods(fns, srcs, a).items()}
        ref = ct2_reference(rows)
        for r in rows.values():
            r["speedup"] = rows[BASELINE]["ms_per_sentence"] / r["ms_per_sentence"]
            if ref:
                r["vs_ct2_int8_beam4"] = rows[ref]["ms_per_sentence"] / r["ms_per_sentence"]
        results[bs] = {"sentences": n_batches * bs, "methods": rows, "wall_s": time.perf_counter() - t0,
                       "ct2_reference": ref}
        peer = rows.get(MARIAN)
        if peer:
            results[bs]["ours_beam4_vs_marian_beam4"] = peer["ms_per_sentence"] / rows[BASELINE]["ms_per_sentence"]
        print_table(bs, rows, a, n_batches * bs)
        if a.device == "cuda" and not a.no_cuda_graphs:
            agree = graph_agreement(at, nat, srcs, a)
            results[bs]["graph_equals_eager"] = agree
            print("  CUDA graph outputs equal to eager: " + ", ".join(f"{k} {v:.1%}" for k, v in agree.items()))
        sys.stdout.flush()
    report = {"machine": info, "args": {k: v for k, v in vars(a).items() if k != "json"},
              "paper_targets_gpu_batch1": PAPER_TARGETS, "peers_skipped": skipped,
              "results": {str(bs): r for bs, r in results.items()}}
    info["loadavg_1m_at_end"] = os.getloadavg()[0]  # others' jobs on shared CPUs distort timings
    print(f"\n1-min load average: {info['loadavg_1m_at_start']:.1f} at start, {info['loadavg_1m_at_end']:.1f} at end "
          f"({os.cpu_count()} CPUs)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {a.json}")
    return report


if __name__ == "__main__":
    main()
