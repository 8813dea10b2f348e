"""evaluate stage: test BLEU/chrF for the AT (beam), the NAT and NAT+LPD, batch-1 latency and
speedups, written as summary.json / summary.md and the three test translations."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from imitate_nat.checkpoint import load_model
from imitate_nat.data import read_lines
from imitate_nat.metrics import bleu, chrf
from imitate_nat.tokenizer import Tokenizer
from imitate_nat.translate import at_beam, nat_lpd, nat_one_pass, translate

from ..artifacts import atomic_write_json, atomic_write_text
from . import StageContext, StageResult

log = logging.getLogger("imitate_orch")


def decoders(at, nat, beam_size: int, delta_t: int, length_penalty: float = 1.0) -> dict:
    """name -> (decoder, cost factor for batching). The rows of Table 1. On a GPU the NAT
    decoders replay CUDA graphs at small batches (imitate_nat/graphs.py: same outputs); the
    AT's beam search stays eager."""
    return {
        "at": (at_beam(at, beam_size=beam_size, length_penalty=length_penalty), beam_size),
        "nat": (nat_one_pass(nat, cuda_graphs=True), 1),
        "lpd": (nat_lpd(nat, at, delta_t=delta_t, length_penalty=length_penalty, cuda_graphs=True),
                2 * delta_t + 1),
    }


def latencies_ms(lines, tok, timed: dict, device, n: int, progress: bool = False) -> dict:
    """Median batch-1 milliseconds per sentence of each decoder (name -> decoder) over the first
    n lines, measured side by side: every sentence is decoded by each decoder in turn, the order
    rotating from one sentence to the next. A CPU whose speed drifts while the figures are taken
    (other load, frequency changes) then moves every decoder alike, so the speedups compare.
    One warm-up call each first; on a GPU every line once, so CUDA graphs are recorded."""
    sample = [l for l in lines if l.strip()][:max(1, n)]
    cuda = torch.cuda.is_available() and str(device).startswith("cuda")
    names = list(timed)
    for name in names:
        for line in sample if cuda else sample[:1]:
            translate([line], tok, timed[name], device=device)
    times = {name: [] for name in names}
    for i, line in enumerate(tqdm(sample, desc="batch-1 latency", disable=not progress)):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            translate([line], tok, timed[name], device=device)
            if cuda:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def translate_and_score(decoder_and_cost, tok, src, ref, batch_tokens: int, device, max_src_len: int):
    """Translate src with one entry of decoders() and score it against ref: (row, hypotheses);
    the row holds BLEU, chrF, their sacreBLEU signatures and the seconds it took."""
    decoder, cost = decoder_and_cost
    t0 = time.perf_counter()
    hyps = translate(src, tok, decoder, batch_tokens=batch_tokens, device=device, max_src_len=max_src_len,
                     cost_factor=cost)
    b, c = bleu(hyps, ref), chrf(hyps, ref)
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": b.signature, "chrf_signature": c.signature,
            "seconds": time.perf_counter() - t0}, hyps


def score_all(decs: dict, tok, src, ref, batch_tokens: int, device, max_src_len: int):
    """Translate src with every decoder of `decs` (from decoders()) and score against ref.
    Returns (rows, hyps)."""
    rows, hyps = {}, {}
    for name, decoder_and_cost in decs.items():
        rows[name], hyps[name] = translate_and_score(decoder_and_cost, tok, src, ref, batch_tokens, device, max_src_len)
    return rows, hyps


def markdown_table(rows: dict, spec) -> str:
    labels = {"at": f"AT demonstrator (beam {spec.eval.beam_size})", "nat": "imitate-NAT",
              "lpd": f"imitate-NAT + LPD (ΔT = {spec.eval.delta_t})"}
    lines = ["| model | BLEU | chrF | ms/sentence (batch 1) | speedup |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {labels[name]} | {r['bleu']:.2f} | {r['chrf']:.2f} | {r['latency_ms']:.1f} | {r['speedup']:.2f}× |")
    sig = next(iter(rows.values()))["bleu_signature"]
    return "\n".join(lines) + f"\n\nsacreBLEU: {sig}\n"


def load_run_models(run_dir: Path, device: str):
    """(tokenizer, AT, NAT) of a finished run directory."""
    tok = Tokenizer(run_dir / "tokenizer" / "spm.model")
    at, _ = load_model(run_dir / "teacher" / "model.pt", device)
    nat, _ = load_model(run_dir / "student" / "model.pt", device)
    return tok, at, nat


def evaluate(ctx: StageContext) -> StageResult:
    spec, out = ctx.spec, ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok, at, nat = load_run_models(ctx.run_dir, device)
    src, ref = read_lines(ctx.stage_path("prepare", "test.src")), read_lines(ctx.stage_path("prepare", "test.tgt"))
    e = spec.eval
    decs = decoders(at, nat, e.beam_size, e.delta_t, e.length_penalty)  # once: on a GPU they hold CUDA graphs
    rows, hyps = score_all(decs, tok, src, ref, e.batch_tokens, device, at.cfg.max_positions)
    lat = latencies_ms(src, tok, {name: decoder for name, (decoder, _) in decs.items()}, device, e.latency_sentences,
                       progress=ctx.progress)
    for name in decs:
        rows[name]["latency_ms"] = lat[name]
        atomic_write_text(out / f"test.{name}.txt", "\n".join(hyps[name]) + "\n")
    for r in rows.values():
        r["speedup"] = rows["at"]["latency_ms"] / r["latency_ms"]
    summary = {"job": spec.name, "test_sentences": len(src), "device": device, "rows": rows}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", markdown_table(rows, spec))
    samples = "\n\n".join(f"SRC: {src[i]}\nREF: {ref[i]}\nAT:  {hyps['at'][i]}\nNAT: {hyps['nat'][i]}\nLPD: {hyps['lpd'][i]}"
                          for i in range(min(10, len(src))))
    ctx.tracker.log_text(samples, "samples.txt")
    metrics = {}
    for name, r in rows.items():
        metrics.update({f"test_bleu_{name}": r["bleu"], f"test_chrf_{name}": r["chrf"],
                        f"latency_ms_{name}": r["latency_ms"], f"speedup_{name}": r["speedup"]})
    outputs = {n: n for n in ("summary.json", "summary.md", "test.at.txt", "test.nat.txt", "test.lpd.txt")}
    return StageResult(outputs=outputs, metrics=metrics)
