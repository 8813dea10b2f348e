"""The Serve endpoint against a real Ray Serve instance on 127.0.0.1 (a free port) serving the
micro run: translations equal offline LPD decoding, bad input gets 4xx JSON errors and the
server keeps answering, concurrent requests are batched and all answered; model sources
(run dir, job YAML, MLflow run id) and the `translate` client."""
from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from click.testing import CliRunner

from imitate_nat.data import read_lines
from imitate_nat.translate import translate
from orchestrator.cli import main
from orchestrator.decoding import decoders, load_run_models
from orchestrator.run.layout import RunNotReady
from orchestrator.serve.client import RetryLog, ServeRequestError, translate_remote
from orchestrator.serve.server import start
from orchestrator.serve.target import ServeSetupError, load_models, resolve_target, stage_runs
from orchestrator.spec.loading import SpecError

from helpers import free_port

# Small limits so that every limit is cheap to cross.
LIMITS = {"max_texts": 8, "max_chars": 300, "max_delta_t": 4, "max_body_bytes": 20_000}


@pytest.fixture(scope="module")
def served(micro_run):
    """One Serve app for the module: (base url, ServeTarget, offline LPD function)."""
    from ray import serve

    run_dir, _ = micro_run
    sets = [f"serve.port={free_port()}", "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.05",
            *(f"serve.{k}={v}" for k, v in LIMITS.items())]
    target = resolve_target(str(run_dir), sets)
    tok, at, nat = load_run_models(run_dir, "cpu")
    ev = target.spec.eval

    def offline(texts, delta_t=ev.delta_t):
        decoder, cost = decoders(at, nat, ev.beam_size, delta_t, ev.length_penalty)["lpd"]
        return translate(texts, tok, decoder, cost_factor=cost, max_src_len=at.cfg.max_positions)

    url = start(target)
    yield url, target, offline
    serve.shutdown()


@pytest.fixture(scope="module")
def sources(micro_run):
    run_dir, _ = micro_run
    return read_lines(run_dir / "prepare" / "test.src")


def test_translations_equal_offline_lpd(served, sources, micro_run):
    url, target, offline = served
    texts = sources[:LIMITS["max_texts"]]
    r = requests.post(f"{url}/translate", json={"texts": texts}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["translations"] == offline(texts)
    assert body["delta_t"] == target.spec.eval.delta_t
    # The model is named: the micro run's MLflow parent run and job.
    assert body["model"]["job"] == micro_run[1].name
    assert body["model"]["run_id"] and len(body["model"]["run_id"]) == 32
    for delta_t in (0, 1, LIMITS["max_delta_t"]):
        r = requests.post(f"{url}/translate", json={"text": texts[0], "delta_t": delta_t}, timeout=60)
        assert r.json() == {**body, "translations": offline(texts[:1], delta_t), "delta_t": delta_t}


def test_health_and_openapi_docs(served):
    url, _, _ = served
    health = requests.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["limits"] == LIMITS
    assert health["replica"].startswith("SERVE_REPLICA::")
    docs = requests.get(f"{url}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    body_schema = spec["paths"]["/translate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body_schema["properties"]) == {"text", "texts", "delta_t"}


def test_start_refuses_another_port_while_serve_runs(served, micro_run):
    url, _, _ = served
    other = resolve_target(str(micro_run[0]), [f"serve.port={free_port()}"])
    with pytest.raises(ServeSetupError, match="Serve already runs on this Ray cluster"):
        start(other)
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def _chunked(data: bytes, size: int = 4096):
    # A generator body: requests sends it chunked, with no Content-Length to check.
    for i in range(0, len(data), size):
        yield data[i: i + size]


OVER = LIMITS["max_body_bytes"] + 1
BAD_REQUESTS = {
    "malformed JSON": ({"data": b'{"text": "a"'}, 400, "malformed JSON"),
    "empty body": ({"data": b""}, 400, "empty request body"),
    "invalid UTF-8": ({"data": b'{"text": "\xff\xfe"}'}, 400, "malformed JSON"),
    "deeply nested JSON": ({"data": b"[" * 15_000}, 400, "malformed JSON"),
    "JSON array": ({"json": ["a"]}, 422, "JSON object"),
    "JSON string": ({"json": "a"}, 422, "JSON object"),
    "missing text": ({"json": {}}, 422, "exactly one of 'text' or 'texts'"),
    "null text": ({"json": {"text": None}}, 422, "exactly one of"),
    "text and texts": ({"json": {"text": "a", "texts": ["b"]}}, 422, "exactly one of"),
    "empty text": ({"json": {"text": ""}}, 422, "text: empty text"),
    "blank text": ({"json": {"text": "  \n "}}, 422, "text: empty text"),
    "no texts": ({"json": {"texts": []}}, 422, "at least one text"),
    "one empty of texts": ({"json": {"texts": ["a", ""]}}, 422, "texts[1]: empty text"),
    "text not a string": ({"json": {"text": 5}}, 422, "text: Input should be a valid string"),
    "texts not a list": ({"json": {"texts": "a b"}}, 422, "texts: Input should be a valid list"),
    "texts item not a string": ({"json": {"texts": ["a", 3]}}, 422, "texts[1]: Input should be a valid string"),
    "delta_t a string": ({"json": {"text": "a", "delta_t": "3"}}, 422, "delta_t: Input should be a valid integer"),
    "delta_t a bool": ({"json": {"text": "a", "delta_t": True}}, 422, "delta_t: Input should be a valid integer"),
    "delta_t a float": ({"json": {"text": "a", "delta_t": 1.5}}, 422, "delta_t: Input should be a valid integer"),
    "delta_t negative": ({"json": {"text": "a", "delta_t": -1}}, 422, "delta_t: must be between 0 and 4"),
    "delta_t too large": ({"json": {"text": "a", "delta_t": 5}}, 422, "delta_t: must be between 0 and 4, got 5"),
    "too many texts": ({"json": {"texts": ["a"] * 9}}, 422, "9 texts, the limit is 8"),
    "text too long": ({"json": {"text": "a" * 301}}, 422, "text: 301 characters, the limit is 300"),
    "unknown field": ({"json": {"text": "a", "beam": 4}}, 422, "beam: Extra inputs are not permitted"),
    "oversized body": ({"data": b'{"text": "' + b"a" * OVER + b'"}'}, 413, "over the limit of 20000 bytes"),
    "oversized chunked body": ({"chunked": b"a" * OVER}, 413, "over the limit"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_4xx_json_and_server_keeps_answering(served, sources, case):
    url, _, offline = served
    kwargs, status, message = BAD_REQUESTS[case]
    if "chunked" in kwargs:
        kwargs = {"data": _chunked(kwargs["chunked"])}
    r = requests.post(f"{url}/translate", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    good = requests.post(f"{url}/translate", json={"text": sources[0]}, timeout=60)
    assert good.status_code == 200 and good.json()["translations"] == offline(sources[:1])


def test_wrong_method_and_path_are_json_errors(served):
    url, _, _ = served
    for r, status in ((requests.get(f"{url}/translate", timeout=10), 405),
                      (requests.post(f"{url}/nowhere", json={}, timeout=10), 404)):
        assert r.status_code == status and r.json()["error"]


def test_50_concurrent_requests_batched_and_all_answered(served, sources):
    url, _, offline = served
    # Mixed ΔT: a batch holding several ΔT values is grouped by ΔT inside the replica.
    jobs = [(sources[i % len(sources)], i % 3) for i in range(50)]
    before = requests.get(f"{url}/health", timeout=10).json()["batches"]
    with ThreadPoolExecutor(50) as pool:
        got = list(pool.map(lambda j: translate_remote(url, j[0], j[1], retries=0), jobs))
    for (text, delta_t), body in zip(jobs, got):
        assert body["translations"] == offline([text], delta_t) and body["delta_t"] == delta_t
    after = requests.get(f"{url}/health", timeout=10).json()["batches"]
    assert after["requests"] - before["requests"] == 50
    assert after["count"] - before["count"] < 50           # requests shared batches
    assert after["max_requests"] > 1


def test_translate_cli(served, sources):
    url, _, offline = served
    texts = sources[:3]
    res = CliRunner().invoke(main, ["translate", "--url", url, "--delta-t", "1", *texts])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == offline(texts, 1)
    # stdin: one output line per input line, a blank line stays blank (and is not sent).
    res = CliRunner().invoke(main, ["translate", "--url", url], input=f"{texts[0]}\n\n{texts[1]}\n")
    assert res.output.split("\n")[:3] == [offline(texts[:1])[0], "", offline(texts[1:2])[0]]
    # More lines than the server takes per request: sent in chunks of its limit.
    many = sources[: LIMITS["max_texts"] + 3]
    res = CliRunner().invoke(main, ["translate", "--url", url], input="\n".join(many))
    assert res.exit_code == 0 and res.output.splitlines() == offline(many)
    res = CliRunner().invoke(main, ["translate", "--url", url, "--delta-t", "9", texts[0]])
    assert res.exit_code == 2 and "delta_t: must be between 0 and 4" in res.output


def test_client_retries_then_gives_up_on_connection_errors():
    retry_log = RetryLog()
    with pytest.raises(ServeRequestError, match="gave up after 3 attempts"):
        translate_remote(f"http://127.0.0.1:{free_port()}", "a", retries=2, backoff_s=0.01, retry_log=retry_log)
    assert len(retry_log.failures) == 3 and all("ConnectionError" in f for f in retry_log.failures)


# ------------------------------------------------------------------ model sources --

def test_sources_job_yaml_and_errors(micro_run, tmp_path):
    run_dir, spec = micro_run
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec.model_dump(mode="json")))  # JSON is YAML
    target = resolve_target(str(job), ["serve.replicas=2"])
    assert target.source.run_dir == str(run_dir) and target.spec.serve.replicas == 2
    assert target.source.run_id == resolve_target(str(run_dir)).source.run_id

    with pytest.raises(SpecError, match="eval.delta_t"):
        resolve_target(str(run_dir), ["eval.delta_t=8", "serve.max_delta_t=5"])
    with pytest.raises(SpecError, match="serve.prot"):
        resolve_target(str(run_dir), ["serve.prot=1"])
    (tmp_path / "unfinished" / "tokenizer").mkdir(parents=True)
    with pytest.raises(RunNotReady, match="stage 'tokenizer' is pending"):  # the one "is this run usable" check
        resolve_target(str(tmp_path / "unfinished"))
    with pytest.raises(ServeSetupError, match="not a run directory"):
        resolve_target("no-such-thing")
    # The CLI: exit 2 before starting anything (a port in use included).
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        for args in (["serve", str(tmp_path / "unfinished")], ["serve", str(job), "--set", "serve.prot=1"],
                     ["serve", str(run_dir), "--delta-t", "11"],
                     ["serve", str(run_dir), "--port", str(busy.getsockname()[1])]):
            res = CliRunner().invoke(main, args)
            assert res.exit_code == 2, (args, res.output)


def test_source_mlflow_run_id(micro_run):
    import torch

    run_dir, spec = micro_run
    uri = f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    run_id = resolve_target(str(run_dir)).source.run_id
    target = resolve_target(run_id, ["serve.max_texts=5"], tracking_uri=uri)
    assert target.spec.name == spec.name and target.spec.serve.max_texts == 5
    assert target.source.run_dir is None and set(target.source.stage_runs) == {"tokenizer", "teacher", "student"}
    tok, at, nat = load_models(target.source, "cpu")
    ref_tok, ref_at, ref_nat = load_run_models(run_dir, "cpu")
    assert tok.encode("a happy bird") == ref_tok.encode("a happy bird")
    for got, ref in ((at, ref_at), (nat, ref_nat)):
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(ServeSetupError, match="not found"):
        resolve_target("0" * 32, tracking_uri=uri)


def test_stage_runs_follow_reused_stages(tmp_path):
    """A rerun that reused stages logged no files for them: they come from the newest earlier
    run of the same job that ran the stage, never from another job."""
    from mlflow import MlflowClient

    from orchestrator.run.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", tmp_path / "art")
    (tmp_path / "model.pt").write_text("x")
    (tmp_path / "spm.model").write_text("x")

    def pipeline(job, reused):
        with tracker.parent(job, {}, tags={"job": job}) as parent:
            ids = {}
            for stage in ("tokenizer", "teacher", "student"):
                with tracker.child(stage, {"reused": stage in reused}) as h:
                    if stage not in reused:
                        h.log_artifact(tmp_path / ("spm.model" if stage == "tokenizer" else "model.pt"))
                    ids[stage] = h.run_id
        return parent.run_id, ids

    _, first = pipeline("a", reused=())
    pipeline("b", reused=())                       # another job, newer: must not be picked
    second_id, second = pipeline("a", reused=("tokenizer", "teacher"))
    client = MlflowClient(tracker.tracking_uri)
    assert stage_runs(client, client.get_run(second_id)) == {
        "tokenizer": first["tokenizer"], "teacher": first["teacher"], "student": second["student"]}
