"""Serve under load, batched vs unbatched, in one run.

Serves SOURCE (a run directory, job YAML or MLflow run id) on a free 127.0.0.1 port with one
replica (1 CPU thread), and for each deployment mode
  batched    serve.max_batch_size = --max-batch-size, serve.batch_wait_timeout_s as in the job
  unbatched  serve.max_batch_size = 1 (each request decoded alone)
drives closed-loop clients at each --concurrency for --duration seconds (after --warmup
seconds): each client sends one sentence per request ({"text": ...}, the job's default ΔT),
waits for the answer, sends the next. Reports requests/s, p50/p99 latency and the mean
batch size, then the two targets:
- batching: batched ÷ unbatched requests/s at the highest concurrency (target ≥ 3×);
- overhead at concurrency 1: (Serve p50 − bare p50) ÷ bare p50, where "bare" is the same
  LPD decoding in this process with 1 thread (translate() one sentence at a time, the first
  128 sentences, which are also the ones the concurrency-1 clients send), measured before Ray
  starts and again after it stops; the mean of the two is used, so that a machine whose speed
  drifts during the run (shared CPUs) shifts both sides alike (target ≤ 20 %). Computed for
  the unbatched deployment (pure Serve and HTTP overhead) and shown for the batched one,
  which also waits up to batch_wait_timeout_s for a batch to fill.
Also printed: the bare decoding in batches of --max-batch-size, i.e. the most batching can
save inside the model, whatever Serve does.
--overload N adds a third deployment, batched with serve.max_queued_requests =
--overload-queue, driven by N clients (more than its 32 request slots and the queue hold)
for --duration seconds: each waits what a 503's Retry-After asks before sending again.
Reported per status: how many answers, p50/p99 latency; overload is handled when the 503s
come back in milliseconds and the 200s' p99 stays bounded instead of growing with N.

    python bench/serve_load.py runs/tiny                      # a finished run
    python bench/serve_load.py jobs/tiny.yaml --duration 20 --json bench/results/serve.json

The sentences are SOURCE's prepare/test.src (or --src FILE). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from orchestrator.serve.server import start  # noqa: E402
from orchestrator.serve.target import resolve_target  # noqa: E402

TARGET_BATCHING = 3.0   # × requests/s at the highest concurrency
TARGET_OVERHEAD = 0.20  # of the bare model's LPD latency at concurrency 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run directory, job YAML or MLflow run id (as for `imitate-orch serve`)")
    p.add_argument("--src", help="sentences, one per line (default: the run's prepare/test.src)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each point (default 2)")
    p.add_argument("--max-batch-size", type=int, default=16, help="batched mode's serve.max_batch_size")
    p.add_argument("--overload", type=int, default=0, metavar="N", help="also the overload scenario, N clients")
    p.add_argument("--overload-queue", type=int, default=8, help="its serve.max_queued_requests (default 8)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--json", metavar="PATH", help="also write all figures as JSON")
    a = p.parse_args(argv)
    a.concurrency = [int(c) for c in a.concurrency.split(",") if c.strip()]
    if min(a.concurrency) < 1 or a.duration <= 0 or a.warmup < 0 or a.max_batch_size < 1:
        p.error("concurrency, duration and max-batch-size must be positive; warmup >= 0")
    return a


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def bare_lpd_ms(target, lines: list[str], batch: int) -> tuple[float, float]:
    """In-process LPD decoding with 1 thread (as a replica has), ms per sentence: median at
    batch 1, and the median per-sentence cost of batches of `batch` sentences (what batching
    can save inside the model, whatever Serve does)."""
    import statistics
    import time

    import torch

    from imitate_nat.translate import translate
    from orchestrator.decoding import decoders
    from orchestrator.serve.target import load_models
    from orchestrator.stages.evaluate import latency_ms

    torch.set_num_threads(1)
    tok, at, nat = load_models(target.source, "cpu")
    e = target.spec.eval
    decoder, cost = decoders(at, nat, e.beam_size, e.delta_t, e.length_penalty)["lpd"]
    single = latency_ms(lines, tok, decoder, "cpu", len(lines))
    per_sentence = []
    for k in range(0, len(lines) - batch + 1, batch):
        t0 = time.perf_counter()
        translate(lines[k: k + batch], tok, decoder, batch_tokens=e.batch_tokens, cost_factor=cost,
                  max_src_len=at.cfg.max_positions)
        per_sentence.append((time.perf_counter() - t0) * 1000 / batch)
    return single, statistics.median(per_sentence) if per_sentence else float("nan")


async def closed_loop(url: str, lines: list[str], concurrency: int, warmup_s: float, duration_s: float) -> dict:
    """`concurrency` clients, each sending the next request when the last is answered."""
    import aiohttp

    loop = asyncio.get_running_loop()
    t_measure = loop.time() + warmup_s
    t_end = t_measure + duration_s
    latencies, errors = [], 0

    async def client(k: int, session) -> None:
        nonlocal errors
        i = k
        while loop.time() < t_end:
            t0 = loop.time()
            try:
                async with session.post(url, json={"text": lines[i % len(lines)]}) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            t1 = loop.time()
            if t_measure <= t1 <= t_end:  # answered inside the measured window
                latencies.append((t1 - t0) * 1000)
                errors += not ok
            i += concurrency

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(k, session) for k in range(concurrency)))
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "rps": len(latencies) / duration_s, "p50_ms": percentile(latencies, 0.5),
            "p99_ms": percentile(latencies, 0.99)}


async def overload(url: str, lines: list[str], clients: int, duration_s: float) -> dict:
    """`clients` clients sending without pause (after a 503, what its Retry-After asks):
    status -> {"n", "p50_ms", "p99_ms"} of the answers."""
    import aiohttp

    loop = asyncio.get_running_loop()
    t_end = loop.time() + duration_s
    by_status: dict[str, list[float]] = defaultdict(list)

    async def client(k: int, session) -> None:
        i = k
        while loop.time() < t_end:
            t0, wait_s = loop.time(), 0.0
            try:
                async with session.post(url, json={"text": lines[i % len(lines)]}) as resp:
                    await resp.read()
                    status = str(resp.status)
                    wait_s = float(resp.headers.get("Retry-After", 0)) if resp.status == 503 else 0.0
            except aiohttp.ClientError as e:
                status = type(e).__name__
            by_status[status].append((loop.time() - t0) * 1000)
            i += clients
            await asyncio.sleep(wait_s)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(client(k, session) for k in range(clients)))
    return {s: {"n": len(v), "p50_ms": percentile(v, 0.5), "p99_ms": percentile(v, 0.99)} for s, v in by_status.items()}


def batch_stats(base: str) -> dict:
    import requests

    return requests.get(f"{base}/health", timeout=30).json()["batches"]


def run_mode(source: str, sets: list[str], tracking_uri, lines, a) -> tuple[dict, list[dict]]:
    target = resolve_target(source, sets, tracking_uri)
    base = start(target)
    url = f"{base}/translate"
    rows = []
    for c in a.concurrency:
        before = batch_stats(base)
        row = asyncio.run(closed_loop(url, lines, c, a.warmup, a.duration))
        after = batch_stats(base)
        batches = max(1, after["count"] - before["count"])
        row["mean_batch"] = (after["requests"] - before["requests"]) / batches
        rows.append(row)
        print(f"  concurrency {c:>3}: {row['rps']:8.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
              f"p99 {row['p99_ms']:7.1f} ms  mean batch {row['mean_batch']:5.2f}  errors {row['errors']}", flush=True)
    return target.spec.serve.model_dump(), rows


def run_overload(a, sets: list[str], lines: list[str]) -> dict:
    target = resolve_target(a.source, sets, a.tracking_uri)
    by_status = asyncio.run(overload(f"{start(target)}/translate", lines, a.overload, a.duration))
    print(f"overload ({a.overload} clients, max_queued_requests {a.overload_queue}):", flush=True)
    for status, row in sorted(by_status.items()):
        print(f"  {status:>6}: {row['n']:6d} answers  p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms")
    return {"clients": a.overload, "serve": target.spec.serve.model_dump(), "by_status": by_status}


def main(argv=None) -> int:
    a = parse_args(argv)
    import ray
    from ray import serve

    from imitate_nat.data import read_lines

    target = resolve_target(a.source, [], a.tracking_uri)
    src = a.src or (target.source.run_dir and os.path.join(target.source.run_dir, "prepare", "test.src"))
    if not src or not os.path.isfile(src):
        sys.exit("error: no sentences: pass --src FILE")
    lines = [l for l in read_lines(src) if l.strip()]

    def measure_bare(when: str) -> tuple[float, float]:
        single, batched = bare_lpd_ms(target, lines[:128], a.max_batch_size)
        print(f"bare LPD {when} (ΔT={target.spec.eval.delta_t}, 1 thread): batch 1 {single:.2f} ms/sentence, "
              f"batch {a.max_batch_size} {batched:.2f} ms/sentence (in-model batching gain "
              f"{single / batched:.2f}×)", flush=True)
        return single, batched

    bare_before = measure_bare("before Serve")

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = f"serve.port={free_port()}"  # one port: Serve's HTTP options are fixed once it runs
    modes = {"batched": [port, f"serve.max_batch_size={a.max_batch_size}"], "unbatched": [port, "serve.max_batch_size=1"]}
    results = {}
    try:
        for name, sets in modes.items():
            print(f"{name}:", flush=True)
            cfg, rows = run_mode(a.source, sets, a.tracking_uri, lines, a)
            results[name] = {"serve": cfg, "rows": rows}
        if a.overload:
            results["overload"] = run_overload(a, [port, f"serve.max_batch_size={a.max_batch_size}",
                                                   f"serve.max_queued_requests={a.overload_queue}"], lines)
    finally:
        serve.shutdown()
        ray.shutdown()
    bare_after = measure_bare("after Serve")
    bare, bare_batched = ((x + y) / 2 for x, y in zip(bare_before, bare_after))

    top = max(a.concurrency)
    rps = {m: next(r["rps"] for r in results[m]["rows"] if r["concurrency"] == top) for m in modes}
    ratio = rps["batched"] / rps["unbatched"]
    summary = {"batching_ratio": ratio, "at_concurrency": top, "bare_lpd_ms": bare,
               "bare_lpd_batched_ms": bare_batched, "bare_lpd_ms_before_after": [bare_before[0], bare_after[0]]}
    print(f"\nbatched ÷ unbatched at concurrency {top}: {ratio:.2f}× (target ≥ {TARGET_BATCHING:.0f}×: "
          f"{'met' if ratio >= TARGET_BATCHING else 'NOT met'})")
    if 1 in a.concurrency:
        for m in modes:
            p50 = next(r["p50_ms"] for r in results[m]["rows"] if r["concurrency"] == 1)
            summary[f"overhead_{m}"] = over = (p50 - bare) / bare
            verdict = f"target ≤ {TARGET_OVERHEAD:.0%}: {'met' if over <= TARGET_OVERHEAD else 'NOT met'}"
            print(f"Serve overhead at concurrency 1, {m}: p50 {p50:.2f} ms vs bare {bare:.2f} ms = "
                  f"{over:+.0%} ({verdict if m == 'unbatched' else 'includes the batch wait'}; bare = mean of before "
                  f"{bare_before[0]:.2f} and after {bare_after[0]:.2f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"source": a.source, "machine": platform.platform(), "cpus": os.cpu_count(),
                       "duration_s": a.duration, "modes": results, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
