"""Serve under load, batched vs unbatched, in one run.

Serves SOURCE (a run directory, job YAML or MLflow run id) on a free 127.0.0.1 port with one
replica (1 CPU thread), and for each deployment mode
  batched    serve.max_batch_size = --max-batch-size, serve.batch_wait_timeout_s as in the job
  unbatched  serve.max_batch_size = 1 (each request decoded alone)
drives closed-loop clients at each --concurrency for --duration seconds (after --warmup
seconds): each client sends one sentence per request ({"text": ...}, the job's default ΔT),
waits for the answer, sends the next. Reports requests/s, p50/p99 latency and the mean
batch size, then the two targets:
- batching: batched ÷ unbatched requests/s at the highest concurrency (target ≥ 1.0× on a
  CPU, where the model itself gains little from batches; ≥ 3× on a GPU);
- overhead at concurrency 1: (Serve p50 − bare p50) ÷ bare p50, where "bare" is the same
  LPD decoding in this process with 1 thread (translate() one sentence at a time, the first
  128 sentences, which are also the ones the concurrency-1 clients send), measured before Ray
  starts and again after it stops; the mean of the two is used, so that a machine whose speed
  drifts during the run (shared CPUs) shifts both sides alike (target ≤ 20 %). Computed for
  the unbatched deployment (pure Serve and HTTP overhead) and shown for the batched one,
  which also waits up to batch_wait_timeout_s for a batch to fill. "Bare" decodes on the CPU
  path the replica uses (eval.cpu_fast). The unbatched overhead is then split with the
  replica's Server-Timing header (its decode, its handler) and set beside Serve's floor: the
  round trip to a deployment that only echoes the text, on the same Serve.
Also printed: the bare decoding in batches of --max-batch-size (in file order, so of mixed
lengths), padded to the longest and grouped as a CPU replica does (serve.length_bucket_ratio),
i.e. the most batching can save inside the model, whatever Serve does.
--overload S adds the overload scenario to the batched deployment (and, with --overload-set,
to it redeployed with those settings): open-loop arrivals (a
request every 1/rate seconds, whether or not earlier ones were answered) at --overload-factor
(default 4) × the batched requests/s at the highest concurrency, for S seconds, no retries.
Reported per status: how many answers, p50/p99 latency; then /health and one more request.
Targets: no answer other than 200 and 429/503; the 200s' p99 ≤ 3× the unloaded p99 (the
batched deployment's at concurrency 1, and also shown against its p99 at the highest
concurrency); the server healthy after.

    python bench/serve_load.py runs/tiny                      # a finished run
    python bench/serve_load.py jobs/tiny.yaml --duration 20 --json bench/results/serve.json
    python bench/serve_load.py runs/multi30k --concurrency 1,32 --overload 60

The sentences are SOURCE's prepare/test.src (or --src FILE). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from orchestrator.run.cluster import free_port  # noqa: E402
from orchestrator.serve.server import enable_direct_ingress, replica_urls, start  # noqa: E402
from orchestrator.serve.target import resolve_target  # noqa: E402

TARGET_BATCHING = {"cpu": 1.0, "cuda": 3.0}   # × requests/s at the highest concurrency
TARGET_OVERHEAD = 0.20  # of the bare model's LPD latency at concurrency 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run directory, job YAML or MLflow run id (as for `imitate-orch serve`)")
    p.add_argument("--src", help="sentences, one per line (default: the run's prepare/test.src)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each point (default 2)")
    p.add_argument("--max-batch-size", type=int, default=16, help="batched mode's serve.max_batch_size")
    p.add_argument("--overload", type=float, default=0, metavar="S", help="also the overload scenario, S seconds")
    p.add_argument("--overload-factor", type=float, default=4.0, help="its rate ÷ the sustainable rate (default 4)")
    p.add_argument("--overload-set", action="append", default=[], metavar="KEY=VALUE",
                   help="also the overload scenario on the batched deployment with these serve settings "
                        "(repeatable), e.g. serve.max_ongoing_requests=2")
    p.add_argument("--direct-port", type=int, default=None, metavar="PORT",
                   help="also at concurrency 1 straight to the replica (serve.direct_port: Serve's direct ingress)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--json", metavar="PATH", help="also write all figures as JSON")
    a = p.parse_args(argv)
    a.concurrency = [int(c) for c in a.concurrency.split(",") if c.strip()]
    if min(a.concurrency) < 1 or a.duration <= 0 or a.warmup < 0 or a.max_batch_size < 1:
        p.error("concurrency, duration and max-batch-size must be positive; warmup >= 0")
    return a


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def bare_lpd_ms(target, lines: list[str], batch: int) -> tuple[float, float, float]:
    """In-process LPD decoding with 1 thread (as a replica has), ms per sentence: median at
    batch 1, and the median per-sentence cost of batches of `batch` sentences, padded to the
    longest and grouped by serve.length_bucket_ratio as a CPU replica does (what batching can
    save inside the model, whatever Serve does)."""
    import statistics
    import time

    import torch

    from imitate_nat.translate import translate
    from orchestrator.decoding import decoders, for_device, latencies_ms
    from orchestrator.serve.target import load_models

    torch.set_num_threads(1)
    tok, at, nat = load_models(target.source, "cpu")
    e = target.spec.eval
    at, nat, _ = for_device(at, nat, "cpu", e.cpu_fast)  # as a CPU replica decodes (eval.cpu_fast)
    decoder, cost = decoders(at, nat, e.beam_size, e.delta_t, e.length_penalty)["lpd"]
    single = latencies_ms(lines, tok, {"lpd": decoder}, "cpu", len(lines))["lpd"]
    per_sentence = {None: [], target.spec.serve.length_bucket_ratio: []}
    for k in range(0, len(lines) - batch + 1, batch):
        for ratio, times in per_sentence.items():  # side by side, batch by batch
            t0 = time.perf_counter()
            translate(lines[k: k + batch], tok, decoder, batch_tokens=e.batch_tokens, cost_factor=cost,
                      max_src_len=at.cfg.max_positions, max_length_ratio=ratio)
            times.append((time.perf_counter() - t0) * 1000 / batch)
    padded, grouped = (statistics.median(t) if t else float("nan") for t in per_sentence.values())
    return single, padded, grouped


async def closed_loop(url: str, lines: list[str], concurrency: int, warmup_s: float, duration_s: float) -> dict:
    """`concurrency` clients, each sending the next request when the last is answered."""
    import aiohttp

    loop = asyncio.get_running_loop()
    t_measure = loop.time() + warmup_s
    t_end = t_measure + duration_s
    latencies, errors = [], 0
    timings = defaultdict(list)  # the replica's Server-Timing: decode and app ms

    async def client(k: int, session) -> None:
        nonlocal errors
        i = k
        while loop.time() < t_end:
            t0 = loop.time()
            try:
                async with session.post(url, json={"text": lines[i % len(lines)]}) as resp:
                    await resp.read()
                    ok = resp.status == 200
                    server_timing = resp.headers.get("Server-Timing", "")
            except aiohttp.ClientError:
                ok, server_timing = False, ""
            t1 = loop.time()
            if t_measure <= t1 <= t_end:  # answered inside the measured window
                latencies.append((t1 - t0) * 1000)
                errors += not ok
                for part in filter(None, server_timing.split(",")):
                    name, _, dur = part.strip().partition(";dur=")
                    timings[name].append(float(dur))
            i += concurrency

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(k, session) for k in range(concurrency)))
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "rps": len(latencies) / duration_s, "p50_ms": percentile(latencies, 0.5),
            "p99_ms": percentile(latencies, 0.99),
            **{f"{name}_p50_ms": percentile(v, 0.5) for name, v in timings.items()}}


def serve_floor_ms(base: str, lines: list[str], a) -> float:
    """p50 of one client's requests to a deployment that only echoes the text back (FastAPI
    ingress, 1 CPU, as the Translator): what Serve's HTTP proxy, the hop to a replica and an
    ASGI app cost on this machine with no model at all."""
    from fastapi import FastAPI
    from pydantic import BaseModel
    from ray import serve

    api = FastAPI()

    class Text(BaseModel):
        text: str

    @serve.deployment(ray_actor_options={"num_cpus": 1})
    @serve.ingress(api)
    class Echo:
        @api.post("/")
        async def echo(self, req: Text) -> dict:
            return {"translations": [req.text]}

    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    try:
        row = asyncio.run(closed_loop(f"{base}/echo", lines, 1, a.warmup, a.duration))
    finally:
        serve.delete("echo")
    return row["p50_ms"]


async def overload(url: str, lines: list[str], rate: float, duration_s: float) -> dict:
    """Open loop: a request every 1/rate seconds for duration_s, each on its own connection
    if need be, none retried. status -> {"n", "p50_ms", "p99_ms"} of the answers."""
    import aiohttp

    loop = asyncio.get_running_loop()
    by_status: dict[str, list[float]] = defaultdict(list)

    async def one(i: int, session) -> None:
        t0 = loop.time()
        try:
            async with session.post(url, json={"text": lines[i % len(lines)]}) as resp:
                await resp.read()
                status = str(resp.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            status = type(e).__name__
        by_status[status].append((loop.time() - t0) * 1000)

    connector = aiohttp.TCPConnector(limit=0)  # no client-side queue: the server sees the rate
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        tasks, t_start, i = [], loop.time(), 0
        while loop.time() < t_start + duration_s:
            tasks.append(asyncio.create_task(one(i, session)))
            i += 1
            await asyncio.sleep(max(0.0, t_start + i / rate - loop.time()))
        await asyncio.gather(*tasks)
    return {s: {"n": len(v), "p50_ms": percentile(v, 0.5), "p99_ms": percentile(v, 0.99)} for s, v in by_status.items()}


def batch_stats(base: str) -> dict:
    import requests

    return requests.get(f"{base}/health", timeout=30).json()["batches"]


def run_mode(source: str, sets: list[str], tracking_uri, lines, a) -> tuple[str, dict, list[dict], dict | None]:
    """Closed-loop rows through Serve's proxy at each concurrency, and with --direct-port the
    concurrency-1 row straight to the replica (else None)."""
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
              f"p99 {row['p99_ms']:7.1f} ms  mean batch {row['mean_batch']:5.2f}  errors {row['errors']}  "
              f"(replica p50: app {row.get('app_p50_ms', float('nan')):.1f} ms, decode "
              f"{row.get('decode_p50_ms', float('nan')):.1f} ms)", flush=True)
    direct = None
    if a.direct_port is not None:   # the same replica, on its own port: no Serve proxy
        replica = replica_urls("127.0.0.1", target.spec.serve.port)[0]
        direct = asyncio.run(closed_loop(f"{replica}/translate", lines, 1, a.warmup, a.duration))
        print(f"  concurrency   1, straight to the replica: {direct['rps']:8.1f} req/s  p50 {direct['p50_ms']:7.1f} ms  "
              f"p99 {direct['p99_ms']:7.1f} ms  errors {direct['errors']}  (replica p50: app "
              f"{direct.get('app_p50_ms', float('nan')):.1f} ms)", flush=True)
    return base, target.spec.serve.model_dump(), rows, direct


def run_overload(a, base: str, rows: list[dict], lines: list[str]) -> dict:
    """The overload scenario against the deployment at `base`, whose closed-loop rows gave the
    sustainable rate (requests/s at the highest concurrency) and the unloaded p99 (concurrency 1)."""
    import requests

    top = max(rows, key=lambda r: r["concurrency"])
    rate = a.overload_factor * top["rps"]
    by_status = asyncio.run(overload(f"{base}/translate", lines, rate, a.overload))
    health = requests.get(f"{base}/health", timeout=30).status_code
    after = requests.post(f"{base}/translate", json={"text": lines[0]}, timeout=60).status_code
    out = {"rate_rps": rate, "seconds": a.overload, "by_status": by_status, "health_after": health,
           "translate_after": after}
    print(f"overload: {rate:.1f} req/s for {a.overload:.0f} s ({a.overload_factor:g}× {top['rps']:.1f} req/s, "
          f"open loop, no retries):", flush=True)
    for status, row in sorted(by_status.items()):
        print(f"  {status:>6}: {row['n']:6d} answers  p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms")
    errors = sum(r["n"] for st, r in by_status.items() if st not in ("200", "429", "503"))
    ok99 = by_status.get("200", {}).get("p99_ms", float("nan"))
    out["errors"] = errors
    for name, ref in (("unloaded", 1), ("loaded", top["concurrency"])):
        row = next((r for r in rows if r["concurrency"] == ref), None)
        if row:
            out[f"p99_vs_{name}"] = ok99 / row["p99_ms"]
            print(f"  200s' p99 {ok99:.0f} ms = {ok99 / row['p99_ms']:.1f}× the p99 at concurrency {ref} "
                  f"({row['p99_ms']:.0f} ms)" + (" (target ≤ 3×)" if ref == 1 else ""))
    print(f"  errors other than 429/503: {errors} (target 0); after: /health {health}, a request {after}", flush=True)
    return out


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

    bucket_ratio = target.spec.serve.length_bucket_ratio

    def measure_bare(when: str) -> tuple[float, float, float]:
        single, padded, grouped = bare_lpd_ms(target, lines[:128], a.max_batch_size)
        print(f"bare LPD {when} (ΔT={target.spec.eval.delta_t}, 1 thread): batch 1 {single:.2f} ms/sentence; "
              f"batches of {a.max_batch_size}: padded to the longest {padded:.2f} ms/sentence (in-model gain "
              f"{single / padded:.2f}×), grouped by length ratio {bucket_ratio} {grouped:.2f} ({single / grouped:.2f}×)",
              flush=True)
        return single, padded, grouped

    bare_before = measure_bare("before Serve")

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    enable_direct_ingress(a.direct_port, joining=False)   # before Ray starts: its processes read it
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = f"serve.port={free_port()}"  # one port: Serve's HTTP options are fixed once it runs
    modes = {"batched": [port, f"serve.max_batch_size={a.max_batch_size}"], "unbatched": [port, "serve.max_batch_size=1"]}
    results = {}
    try:
        for name, sets in modes.items():
            print(f"{name}:", flush=True)
            base, cfg, rows, direct = run_mode(a.source, sets, a.tracking_uri, lines, a)
            results[name] = {"serve": cfg, "rows": rows, "direct_c1": direct}
            if name == "unbatched" and 1 in a.concurrency:
                results["floor_p50_ms"] = serve_floor_ms(base, lines, a)
                print(f"Serve's floor (an echo deployment, concurrency 1): p50 {results['floor_p50_ms']:.2f} ms",
                      flush=True)
            if a.overload and name == "batched":
                results["overload"] = run_overload(a, base, rows, lines)
                if a.overload_set:
                    print(f"overload with {' '.join(a.overload_set)}:", flush=True)
                    tuned = start(resolve_target(a.source, sets + a.overload_set, a.tracking_uri))
                    results["overload_tuned"] = {"sets": a.overload_set, **run_overload(a, tuned, rows, lines)}
    finally:
        serve.shutdown()
        ray.shutdown()
    bare_after = measure_bare("after Serve")
    bare, bare_padded, bare_grouped = ((x + y) / 2 for x, y in zip(bare_before, bare_after))
    import torch

    device = "cuda" if target.spec.serve.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
    target_ratio = TARGET_BATCHING[device]

    top = max(a.concurrency)
    rps = {m: next(r["rps"] for r in results[m]["rows"] if r["concurrency"] == top) for m in modes}
    ratio = rps["batched"] / rps["unbatched"]
    summary = {"batching_ratio": ratio, "at_concurrency": top, "device": device, "bare_lpd_ms": bare,
               "bare_lpd_padded_ms": bare_padded, "bare_lpd_grouped_ms": bare_grouped,
               "bare_lpd_ms_before_after": [bare_before[0], bare_after[0]]}
    print(f"\nbatched ÷ unbatched at concurrency {top}: {ratio:.2f}× (target on the {device} ≥ {target_ratio:.1f}×: "
          f"{'met' if ratio >= target_ratio else 'NOT met'})")
    if 1 in a.concurrency:
        for m in modes:
            p50 = next(r["p50_ms"] for r in results[m]["rows"] if r["concurrency"] == 1)
            summary[f"overhead_{m}"] = over = (p50 - bare) / bare
            verdict = f"target ≤ {TARGET_OVERHEAD:.0%}: {'met' if over <= TARGET_OVERHEAD else 'NOT met'}"
            print(f"Serve overhead at concurrency 1, {m}: p50 {p50:.2f} ms vs bare {bare:.2f} ms = "
                  f"{over:+.0%} ({verdict if m == 'unbatched' else 'includes the batch wait'}; bare = mean of before "
                  f"{bare_before[0]:.2f} and after {bare_after[0]:.2f})")
        row = next(r for r in results["unbatched"]["rows"] if r["concurrency"] == 1)
        if "app_p50_ms" in row:
            # Where the unbatched overhead goes: the replica's decoding against the bare model's,
            # the handler around it (validation, tokenizing for the limits, @serve.batch), and
            # everything outside the handler (client, HTTP proxy, hop to the replica), next to
            # what that last part costs with no model (the echo deployment).
            split = {"decode_minus_bare_ms": row["decode_p50_ms"] - bare,
                     "handler_ms": row["app_p50_ms"] - row["decode_p50_ms"],
                     "outside_handler_ms": row["p50_ms"] - row["app_p50_ms"],
                     "floor_ms": results["floor_p50_ms"]}
            summary["overhead_split_unbatched"] = split
            print("  unbatched, where it goes (p50s): replica's decode − bare {decode_minus_bare_ms:+.2f} ms, "
                  "handler around the decode {handler_ms:.2f} ms, outside the handler {outside_handler_ms:.2f} ms "
                  "(an echo deployment's whole round trip: {floor_ms:.2f} ms)".format(**split))
        for m in modes:
            direct = results[m]["direct_c1"]
            if direct:
                summary[f"overhead_{m}_direct"] = over = (direct["p50_ms"] - bare) / bare
                print(f"Serve overhead at concurrency 1, {m}, straight to the replica (serve.direct_port): p50 "
                      f"{direct['p50_ms']:.2f} ms vs bare {bare:.2f} ms = {over:+.0%}"
                      + (f" (target ≤ {TARGET_OVERHEAD:.0%}: {'met' if over <= TARGET_OVERHEAD else 'NOT met'}); "
                         f"outside the handler {direct['p50_ms'] - direct['app_p50_ms']:.2f} ms"
                         if m == "unbatched" else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"source": a.source, "machine": platform.platform(), "cpus": os.cpu_count(),
                       "duration_s": a.duration, "modes": results, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
