"""Serve reliability: a replica killed under load loses no request (the client retries while
Serve replaces it), and `imitate-orch serve` stops cleanly on Ctrl-C."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
from click.testing import CliRunner

from imitate_nat.data import read_lines
from imitate_nat.translate import translate
from orchestrator.cli import main
from orchestrator.decoding import decoders, for_device, load_run_models
from orchestrator.serve.client import RetryLog, ServeRequestError, translate_remote
from orchestrator.serve.server import start
from orchestrator.serve.target import resolve_target

from helpers import free_port


def _offline_lpd(run_dir, texts, spec):
    """One request's texts decoded offline, batched as a CPU replica batches them (test_serve.py)."""
    tok, at, nat = load_run_models(run_dir, "cpu")
    at, nat, _ = for_device(at, nat, "cpu", spec.eval.cpu_fast)
    decoder, cost = decoders(at, nat, spec.eval.beam_size, spec.eval.delta_t, spec.eval.length_penalty)["lpd"]
    return translate(texts, tok, decoder, batch_tokens=spec.eval.batch_tokens, cost_factor=cost,
                     max_src_len=at.cfg.max_positions, max_length_ratio=spec.serve.length_bucket_ratio)


def _replica_ids(url: str, n: int = 30) -> set[str]:
    """Replica ids answering /health (requests are spread over the replicas)."""
    seen = set()
    for _ in range(n):
        try:
            seen.add(requests.get(f"{url}/health", timeout=5).json()["replica"])
        except (requests.RequestException, ValueError):
            pass
    return seen


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.mark.slow
def test_replica_killed_under_load_loses_no_request(micro_run):
    import ray
    from ray import serve

    run_dir, _ = micro_run
    target = resolve_target(str(run_dir), [f"serve.port={free_port()}", "serve.replicas=2"])
    text = read_lines(run_dir / "prepare" / "test.src")[0]
    expected = _offline_lpd(run_dir, [text], target.spec)
    url = start(target)
    retry_log, answered, lost, stop = RetryLog(), [], [], threading.Event()

    def client():
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    answered.append(translate_remote(url, text, session=session, retries=8, backoff_s=0.1,
                                                     retry_log=retry_log)["translations"])
                except ServeRequestError as e:
                    lost.append(str(e))

    threads = [threading.Thread(target=client) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        replicas = _wait_for(lambda: ids if len(ids := _replica_ids(url)) == 2 else None, 60, "2 replicas")
        victim = min(replicas)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        at_kill = len(answered)
        # Serve notices the death and starts a replacement; requests keep being answered meanwhile.
        _wait_for(lambda: _replica_ids(url, 10) - replicas, 90, "a replacement replica")
        _wait_for(lambda: len(answered) > at_kill + 20, 30, "more answers after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        serve.shutdown()
    # The figure for BENCHMARKS.md (run with -s to see it).
    print(f"\nreplica killed under load (8 clients): {len(answered)} requests answered, "
          f"{len(retry_log.failures)} failed attempts retried, {len(lost)} lost; "
          f"failures: {sorted(set(retry_log.failures))}")
    assert lost == []
    assert answered and all(t == expected for t in answered)


@pytest.mark.slow
def test_cli_serve_translate_and_ctrl_c(micro_run, ray_local):
    """The real command in a subprocess (joining this session's Ray cluster, so no second one
    starts), the `translate` command against it, then SIGINT: exit 0 and the port closes."""
    from ray import serve

    run_dir, spec = micro_run
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", str(run_dir), "--port", str(port),
                             "--address", ray_local.get_runtime_context().gcs_address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            if proc.poll() is not None:
                raise AssertionError(f"serve exited {proc.returncode}: {proc.stdout.read()[-2000:]}")
            try:
                return requests.get(f"{url}/health", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        _wait_for(up, 120, "imitate-orch serve to answer")
        texts = read_lines(run_dir / "prepare" / "test.src")[:2]
        res = CliRunner().invoke(main, ["translate", "--url", url, *texts])
        assert res.exit_code == 0, res.output
        assert res.output.splitlines() == _offline_lpd(run_dir, texts, spec)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=5)
    assert serve.status().applications == {}


def test_cli_serve_direct_to_the_replica(micro_run, tmp_path):
    """serve.direct_port: the command starts a Ray cluster of its own with Serve's direct
    ingress, and the replica answers on that port itself (the proxy's port too), with the
    same translations and the same JSON errors; Ctrl-C stops both."""
    import os

    run_dir, spec = micro_run
    port, direct = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # its own cluster, beside this session's
    log = tmp_path / "serve.log"
    with open(log, "w") as out:   # a file, not a pipe: Ray's logs could fill a pipe nobody reads
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", str(run_dir), "--port", str(port),
                                 "--set", f"serve.direct_port={direct}", "--set", "ray.num_cpus=2"],
                                stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        def up():   # the command says where to go once every replica is up
            if proc.poll() is not None:
                raise AssertionError(f"serve exited {proc.returncode}: {log.read_text()[-3000:]}")
            return f"direct to the replicas (no Serve proxy): http://127.0.0.1:{direct}/translate" in log.read_text()

        _wait_for(up, 180, "imitate-orch serve to print the replica's URL")
        texts = read_lines(run_dir / "prepare" / "test.src")[:2]
        expected = _offline_lpd(run_dir, texts, spec)
        for base in (f"http://127.0.0.1:{direct}", f"http://127.0.0.1:{port}"):
            r = requests.post(f"{base}/translate", json={"texts": texts}, timeout=60)
            assert r.status_code == 200 and r.json()["translations"] == expected, (base, r.text)
            assert "decode;dur=" in r.headers["Server-Timing"]
        bad = requests.post(f"http://127.0.0.1:{direct}/translate", data=b"{", timeout=30,
                            headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for p in (port, direct):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{p}/health", timeout=5)


def test_direct_port_refused_when_joining_a_cluster_started_without_it(monkeypatch):
    from orchestrator.serve.server import DIRECT_INGRESS, enable_direct_ingress
    from orchestrator.serve.target import ServeSetupError

    monkeypatch.delenv(DIRECT_INGRESS, raising=False)
    with pytest.raises(ServeSetupError, match="must have been started with RAY_SERVE_ENABLE_DIRECT_INGRESS=1"):
        enable_direct_ingress(9001, joining=True)
    enable_direct_ingress(None, joining=True)   # off: nothing to check
    assert DIRECT_INGRESS not in __import__("os").environ
