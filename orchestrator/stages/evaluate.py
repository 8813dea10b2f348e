"""evaluate stage: test BLEU/chrF for the AT (beam), the NAT and NAT+LPD, batch-1 latency and
speedups, written as summary.json / summary.md and the three test translations."""
from __future__ import annotations

import logging

import torch

from imitate_nat.data import read_lines

from ..decoding import decoders, latencies_ms, load_run_models, score_all
from ..run.files import atomic_write_json, atomic_write_text
from ..run.runner import StageContext, StageResult

log = logging.getLogger("imitate_orch")


def summary_table(rows: dict, spec) -> str:
    """Table 1's layout: BLEU, chrF, batch-1 latency and speedup of each decoder."""
    labels = {"at": f"AT demonstrator (beam {spec.eval.beam_size})", "nat": "imitate-NAT",
              "lpd": f"imitate-NAT + LPD (ΔT = {spec.eval.delta_t})"}
    lines = ["| model | BLEU | chrF | ms/sentence (batch 1) | speedup |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {labels[name]} | {r['bleu']:.2f} | {r['chrf']:.2f} | {r['latency_ms']:.1f} | {r['speedup']:.2f}× |")
    sig = next(iter(rows.values()))["bleu_signature"]
    return "\n".join(lines) + f"\n\nsacreBLEU: {sig}\n"


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
    atomic_write_text(out / "summary.md", summary_table(rows, spec))
    samples = "\n\n".join(f"SRC: {src[i]}\nREF: {ref[i]}\nAT:  {hyps['at'][i]}\nNAT: {hyps['nat'][i]}\nLPD: {hyps['lpd'][i]}"
                          for i in range(min(10, len(src))))
    ctx.tracker.log_text(samples, "samples.txt")
    metrics = {}
    for name, r in rows.items():
        metrics.update({f"test_bleu_{name}": r["bleu"], f"test_chrf_{name}": r["chrf"],
                        f"latency_ms_{name}": r["latency_ms"], f"speedup_{name}": r["speedup"]})
    outputs = {n: n for n in ("summary.json", "summary.md", "test.at.txt", "test.nat.txt", "test.lpd.txt")}
    return StageResult(outputs=outputs, metrics=metrics)
