"""evaluate stage: test BLEU/chrF/TER for the AT (beam), the NAT and NAT+LPD, batch-1 latency and
speedups, written as summary.json / summary.md and the three test translations.

The decoding and timing run in one Ray task holding `eval.cpus` CPUs (also its torch threads)
and `eval.gpus` GPUs, so on a cluster they happen on a GPU node rather than on the CPU-only head
that runs the driver. The task reads the models and the test set from the run dir (shared
storage, as for distillation) and returns the scores, the translations and where it ran, all
small; the driver writes the files atomically. The summary names the node and device that
produced the latency figures, since they mean nothing without them, and on a CPU the mode of
the CPU inference path (eval.cpu_fast: int8 or bf16 copies of the models) that produced both
the scores and the latencies.
"""
from __future__ import annotations

import logging
import socket
from pathlib import Path

import ray
import torch

from ..decoding import decoders, for_device, latencies_ms, load_run_models, read_split, score_all
from ..run.cluster import check_fits_cluster, init_ray
from ..run.files import atomic_write_json, atomic_write_lines, atomic_write_text
from ..run.runner import StageContext, StageResult
from ..spec.schema import EvalSpec

log = logging.getLogger("imitate_orch")


def summary_table(rows: dict, spec, where: dict) -> str:
    """Table 1's layout: BLEU, chrF, TER, batch-1 latency and speedup of each decoder, then where
    the latencies were measured and the sacreBLEU signatures of BLEU and TER."""
    student = spec.student.label()
    labels = {"at": f"AT demonstrator (beam {spec.eval.beam_size})", "nat": student,
              "lpd": f"{student} + LPD (ΔT = {spec.eval.delta_t})"}
    lines = ["| model | BLEU | chrF | TER | ms/sentence (batch 1) | speedup |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {labels[name]} | {r['bleu']:.2f} | {r['chrf']:.2f} | {r['ter']:.2f} | {r['latency_ms']:.1f} "
                     f"| {r['speedup']:.2f}× |")
    node = where["node"]
    first = next(iter(rows.values()))
    path = f" (CPU path: {where['cpu_fast']}, eval.cpu_fast)" if where.get("cpu_fast") else ""
    return ("\n".join(lines) + f"\n\nDecoded and timed on {where['device']}{path}, {where['torch_threads']} torch thread(s), "
            f"node {node['hostname']} ({node['ip']}, Ray node {node['id']}).\n\nsacreBLEU: {first['bleu_signature']}\n"
            f"TER: {first['ter_signature']}\n")


def where_this_runs(device: str, cpu_fast: str | None = None) -> dict:
    """The Ray node and device of the calling process: {"node": {id, hostname, ip}, "device"
    (e.g. "cpu", "cuda:0 (NVIDIA H200)"), "cpu_fast" (the CPU path's mode, None when not
    taken), "torch_threads"}."""
    if device.startswith("cuda"):
        index = torch.cuda.current_device()
        device = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    node = {"id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
            "ip": ray.util.get_node_ip_address()}
    return {"node": node, "device": device, "cpu_fast": cpu_fast, "torch_threads": torch.get_num_threads()}


def decode_and_time(rd: Path, e: EvalSpec) -> dict:
    """The Ray task: translate and score the test set with each decoder, then time them at batch 1.
    Returns {"rows": {name: row with latency_ms}, "hyps": {name: lines}, "where": where_this_runs()}."""
    torch.set_num_threads(max(1, int(e.cpus)))
    device = "cuda" if e.gpus > 0 and torch.cuda.is_available() else "cpu"
    tok, at, nat = load_run_models(rd, device)
    at, nat, cpu_fast = for_device(at, nat, device, e.cpu_fast)
    src, ref = read_split(rd, "test")
    decs = decoders(at, nat, e.beam_size, e.delta_t, e.length_penalty)  # once: on a GPU they hold CUDA graphs
    rows, hyps = score_all(decs, tok, src, ref, e.batch_tokens, device, at.cfg.max_positions, e.bleu_tokenize)
    lat = latencies_ms(src, tok, {name: decoder for name, (decoder, _) in decs.items()}, device, e.latency_sentences)
    for name in decs:
        rows[name]["latency_ms"] = lat[name]
    return {"rows": rows, "hyps": hyps, "where": where_this_runs(device, cpu_fast)}


def evaluate(ctx: StageContext) -> StageResult:
    spec, out, e = ctx.spec, ctx.out_dir, ctx.spec.eval
    out.mkdir(parents=True, exist_ok=True)
    init_ray(spec)
    check_fits_cluster(spec, sections=("eval",))   # a task no node can hold would wait for ever
    log.info("evaluate: decoding and timing in a Ray task (%g CPU, %g GPU)", e.cpus, e.gpus)
    # Ray's default retries rerun the task after a lost node: it only reads the run dir.
    task = ray.remote(decode_and_time).options(num_cpus=e.cpus, num_gpus=e.gpus)
    res = ray.get(task.remote(ctx.run_dir, e))
    rows, hyps, where = res["rows"], res["hyps"], res["where"]
    log.info("evaluate: ran on %s%s, node %s (%s)", where["device"],
             f" (CPU path: {where['cpu_fast']})" if where["cpu_fast"] else "", where["node"]["hostname"],
             where["node"]["ip"])
    for name, lines in hyps.items():
        atomic_write_lines(out / f"test.{name}.txt", lines)
    for r in rows.values():
        r["speedup"] = rows["at"]["latency_ms"] / r["latency_ms"]
    src, ref = read_split(ctx.run_dir, "test")
    summary = {"job": spec.name, "test_sentences": len(src), **where, "rows": rows}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_table(rows, spec, where))
    samples = "\n\n".join(f"SRC: {src[i]}\nREF: {ref[i]}\nAT:  {hyps['at'][i]}\nNAT: {hyps['nat'][i]}\nLPD: {hyps['lpd'][i]}"
                          for i in range(min(10, len(src))))
    ctx.tracker.log_text(samples, "samples.txt")
    metrics = {}
    for name, r in rows.items():
        metrics.update({f"test_bleu_{name}": r["bleu"], f"test_chrf_{name}": r["chrf"], f"test_ter_{name}": r["ter"],
                        f"latency_ms_{name}": r["latency_ms"], f"speedup_{name}": r["speedup"]})
    outputs = {n: n for n in ("summary.json", "summary.md", "test.at.txt", "test.nat.txt", "test.lpd.txt")}
    return StageResult(outputs=outputs, metrics=metrics)
