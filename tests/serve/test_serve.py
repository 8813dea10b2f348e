"""The Serve endpoint against a real Ray Serve instance on 127.0.0.1 (a free port) serving the
micro run: translations equal offline LPD decoding, bad input (malformed, wrong Content-Type,
Unicode oddities, over a limit or the decoding budget) gets 4xx JSON errors, fails alone and
the server keeps answering; no response names a path; concurrent requests are batched and all
answered; half-sent bodies time out (408) and overload is answered at once (503, Retry-After);
the `translate` client. Model sources are in test_target.py, the pieces that need no server
in test_units.py."""
from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from click.testing import CliRunner

from imitate_nat.data import read_lines
from imitate_nat.translate import translate
from orchestrator.cli import main
from orchestrator.decoding import decoders, for_device, load_run_models
from orchestrator.serve.app import MAX_DECODERS
from orchestrator.serve.client import translate_remote
from orchestrator.serve.server import start
from orchestrator.serve.target import ServeSetupError, resolve_target

from helpers import free_port

# Small limits so that every limit is cheap to cross; max_chars leaves room for a text over the
# model's source tokens (the micro model's 1024 positions), max_lpd_tokens for one at ΔT 4.
LIMITS = {"max_texts": 8, "max_chars": 6000, "max_delta_t": 4, "max_body_bytes": 20_000, "max_lpd_tokens": 12_000}
# Overload: SLOTS request slots in the replica (serve.max_ongoing_requests, below the default
# 32: the overload test then sees 503s only if the setting applies), then QUEUED wait in Serve's
# proxy, then 503. Serve may count requests as queued for a moment before it assigns them to
# free slots: QUEUED is over the 50 concurrent requests below, so that none is ever refused.
BODY_TIMEOUT_S, QUEUED, SLOTS = 3, 64, 16
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def served(micro_run):
    """One Serve app for the module: (base url, ServeTarget, offline LPD function)."""
    from ray import serve

    run_dir, _ = micro_run
    sets = [f"serve.port={free_port()}", "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.05",
            f"serve.body_timeout_s={BODY_TIMEOUT_S}", f"serve.max_queued_requests={QUEUED}",
            f"serve.max_ongoing_requests={SLOTS}",
            "serve.request_timeout_s=45", *(f"serve.{k}={v}" for k, v in LIMITS.items())]
    target = resolve_target(str(run_dir), sets)
    tok, at, nat = load_run_models(run_dir, "cpu")
    ev = target.spec.eval
    at, nat, _ = for_device(at, nat, "cpu", ev.cpu_fast)   # what a CPU replica decodes with

    def offline(texts, delta_t=ev.delta_t):
        """The texts of one request, batched as a CPU replica batches them (by length, in
        buckets of serve.length_bucket_ratio): in bf16 on a CPU with native BF16 a sentence's
        rounding, and now and then its translation, depends on the batch it is padded into."""
        decoder, cost = decoders(at, nat, ev.beam_size, delta_t, ev.length_penalty)["lpd"]
        return translate(texts, tok, decoder, batch_tokens=ev.batch_tokens, cost_factor=cost,
                         max_src_len=at.cfg.max_positions, max_length_ratio=target.spec.serve.length_bucket_ratio)

    offline.tok, offline.max_tokens = tok, at.cfg.max_positions - 1
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
    # Where the time went: the batch's decoding within the handler's time.
    timing = dict(part.strip().split(";dur=") for part in r.headers["Server-Timing"].split(","))
    assert 0 < float(timing["decode"]) <= float(timing["app"]), timing
    for delta_t in (0, 1, LIMITS["max_delta_t"]):
        r = requests.post(f"{url}/translate", json={"text": texts[0], "delta_t": delta_t}, timeout=60)
        assert r.json() == {**body, "translations": offline(texts[:1], delta_t), "delta_t": delta_t}


def test_health_and_openapi_docs(served):
    url, _, offline = served
    health = requests.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["limits"] == {**LIMITS, "max_tokens": offline.max_tokens}
    assert health["replica"].startswith("SERVE_REPLICA::")
    assert (health["device"], health["cpu_fast"]) == ("cpu", "bf16")   # the micro job's eval.cpu_fast
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
    "malformed JSON": ({"data": b'{"text": "a"', "headers": JSON}, 400, "malformed JSON"),
    "empty body": ({"data": b"", "headers": JSON}, 400, "empty request body"),
    "invalid UTF-8": ({"data": b'{"text": "\xff\xfe"}', "headers": JSON}, 400, "malformed JSON"),
    "deeply nested JSON": ({"data": b"[" * 15_000, "headers": JSON}, 400, "malformed JSON"),
    "raw NUL in a JSON string": ({"data": b'{"text": "a\x00b"}', "headers": JSON}, 400, "malformed JSON"),
    "raw newline in a JSON string": ({"data": b'{"text": "a\nb"}', "headers": JSON}, 400, "malformed JSON"),
    # A page on any web site can make a browser send these to localhost without asking.
    "text/plain body": ({"data": b'{"text": "a"}', "headers": {"Content-Type": "text/plain"}}, 415,
                        "Content-Type must be application/json, got 'text/plain'"),
    "form body": ({"data": {"text": "a"}}, 415, "got 'application/x-www-form-urlencoded'"),
    "multipart body": ({"files": {"text": ("a.json", b'{"text": "a"}', "application/json")}}, 415,
                       "got 'multipart/form-data"),
    "no Content-Type": ({"data": b'{"text": "a"}'}, 415, "got 'none'"),
    "JSON look-alike type": ({"data": b'{"text": "a"}', "headers": {"Content-Type": "application/jsonx"}}, 415,
                             "Content-Type must be"),
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
    "text too long": ({"json": {"text": "a" * 6001}}, 422, "text: 6001 characters, the limit is 6000"),
    "unknown field": ({"json": {"text": "a", "beam": 4}}, 422, "beam: Extra inputs are not permitted"),
    "oversized body": ({"data": b'{"text": "' + b"a" * OVER + b'"}', "headers": JSON}, 413,
                       "over the limit of 20000 bytes"),
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


BIRD = "a happy bird sees the horse"
# Unicode oddities: (text or texts, expected status: 200, 422, or None for "200 or a 4xx naming a
# limit", what the 422 says). Sent as raw UTF-8; what UTF-8 cannot carry (lone surrogates) and
# the cases named "escaped" as JSON escapes ("\ud800"), as a client spells them.
ODDITIES = {
    "lone high surrogate": ("\ud800", 422, "text: not valid Unicode (lone surrogate U+D800 at character 0)"),
    "lone low surrogate inside": (f"a\udc00{BIRD}", 422, "lone surrogate U+DC00 at character 1"),
    "surrogate in texts[1]": ([BIRD, "b\udfff"], 422, "texts[1]: not valid Unicode"),
    "NUL only": ("\x00", 422, "text: empty text"),
    "NUL and controls inside": (f"a\x00{BIRD}\x1b[31m\x07", 200, None),
    "controls only": ("\x01\x02\x1b\x7f", 422, "empty text"),
    "zero-width space": ("\u200b", 422, "empty text"),
    "BOM": ("\ufeff", 422, "empty text"),
    "zero-width joiners, word joiner, BOM": ("\u200c\u200d\u2060\ufeff", 422, "empty text"),
    "bidi marks only": ("\u200e\u200f\u202a\u202e\u2066\u2069", 422, "empty text"),
    "soft hyphen and tag characters": ("\u00ad\U000e0001\U000e0041", 422, "empty text"),
    "NBSP, ideographic space, line separators": ("\u00a0\u3000\u2028\u2029\u0085", 422, "empty text"),
    "replacement character only": ("\ufffd", 422, "text: empty text (no token to translate)"),
    "zero-width and bidi marks inside": (f"\ufeff\u202e{BIRD}\u200b\u202c", 200, None),
    "emoji": ("\U0001f600", 200, None),
    "emoji ZWJ sequence and flags": ("\U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1e9\U0001f1ea", 200, None),
    "escaped surrogate pair (emoji)": ("\U0001f426 " + BIRD, 200, None),
    "CJK": ("鸟看见马。中文翻译", 200, None),
    "Arabic and Hebrew": ("طائر سعيد يرى الحصان שלום", 200, None),
    "combining marks only": ("\u0301\u0302\u0303" * 10, 200, None),
    "Zalgo": ("b" + "\u0301\u0336" * 400 + "ird", 200, None),
    "private use and noncharacters": ("\ue000\uffff\U0010fffe", 200, None),
    "one 5,000-char token": ("ж" * 5000, None, "tokens, the limit is"),
    "one 5,000-char ASCII token": ("x" * 5000, None, "tokens, the limit is"),
    "newlines inside a text": (f"{BIRD}\nthe dog\r\nruns\u2028away", 200, None),
    "all of them in one request": ([f"a\x00{BIRD}", "\U0001f600", "鸟看见马", "\u0301" * 5, f"{BIRD}\nx"], 200, None),
}


@pytest.mark.parametrize("case", list(ODDITIES))
def test_unicode_oddities_get_one_translation_per_text_or_a_4xx(served, sources, case):
    url, _, offline = served
    texts, status, message = ODDITIES[case]
    payload = {"texts" if isinstance(texts, list) else "text": texts}
    try:
        body = json.dumps(payload, ensure_ascii="escaped" in case).encode("utf-8")
    except UnicodeEncodeError:
        body = json.dumps(payload).encode()
    r = requests.post(f"{url}/translate", data=body, headers=JSON, timeout=60)
    assert r.status_code in ((200, 422) if status is None else (status,)), r.text
    if r.status_code == 200:
        got = r.json()["translations"]
        n = len(texts) if isinstance(texts, list) else 1
        assert len(got) == n and all("\n" not in t and "\r" not in t for t in got)
    else:
        assert message in r.json()["error"]
    good = requests.post(f"{url}/translate", json={"text": sources[0]}, timeout=60)
    assert good.status_code == 200 and good.json()["translations"] == offline(sources[:1])


def test_bad_requests_batched_with_good_ones_fail_alone(served, sources):
    """A lone surrogate used to reach the batch and crash the tokenizer there, failing every
    request batched with it (and the client retried them all)."""
    url, _, offline = served
    jobs = [{"text": sources[i % 4]} if i % 2 else {"text": f"{sources[0]}\ud800"} for i in range(16)]

    def post(payload):
        return requests.post(f"{url}/translate", json=payload, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(post, jobs))
    for payload, r in zip(jobs, got):
        if "\ud800" in payload["text"]:
            assert r.status_code == 422 and "lone surrogate" in r.json()["error"]
        else:
            assert r.status_code == 200, r.text
            assert r.json()["translations"] == offline([payload["text"]])


def _word_text(tok, sources, n: int) -> str:
    """A text of exactly n source tokens: a word that is one token, n times."""
    word = min((w for w in " ".join(sources).split() if len(tok.encode(w)) == 1), key=len)
    text = " ".join([word] * n)
    assert len(tok.encode(text)) == n
    return text


def test_texts_over_the_model_positions_get_422_and_at_the_limit_decode(served, sources):
    """max_tokens (= max_positions - 1, one position kept for EOS) is the source the model takes.
    One token more used to be truncated and, like a text at the limit, overflow the AT's
    positional table in LPD rescoring (ΔT ≥ 1): a 500 for it and every request batched with it."""
    url, _, offline = served
    limit = offline.max_tokens
    at_limit, over = _word_text(offline.tok, sources, limit), _word_text(offline.tok, sources, limit + 1)
    for delta_t in (1, LIMITS["max_delta_t"]):
        r = requests.post(f"{url}/translate", json={"texts": [sources[0], at_limit], "delta_t": delta_t}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["translations"] == offline([sources[0], at_limit], delta_t)
    r = requests.post(f"{url}/translate", json={"texts": [sources[0], over]}, timeout=60)
    assert r.status_code == 422
    assert r.json()["error"].startswith(f"texts[1]: {limit + 1} tokens, the limit is {limit} ")


def test_a_request_over_the_decoding_budget_gets_422_before_decoding(served, sources):
    """max_lpd_tokens bounds what one request costs: its source tokens × (2ΔT+1) LPD candidates."""
    url, _, offline = served
    text = _word_text(offline.tok, sources, 700)
    before = requests.get(f"{url}/health", timeout=10).json()["batches"]
    r = requests.post(f"{url}/translate", json={"texts": [text, text], "delta_t": 4}, timeout=60)
    assert r.status_code == 422
    assert r.json()["error"] == ("texts: 1400 source tokens × 9 LPD candidates (ΔT 4) = 12600, the limit is 12000 "
                                 "per request (max_lpd_tokens): send fewer texts or a smaller delta_t")
    assert requests.get(f"{url}/health", timeout=10).json()["batches"] == before   # nothing was decoded


def test_lpd_decoders_kept_per_replica_are_capped(served, sources):
    url, _, offline = served
    for delta_t in range(LIMITS["max_delta_t"] + 1):
        r = requests.post(f"{url}/translate", json={"text": sources[0], "delta_t": delta_t}, timeout=60)
        assert r.json()["translations"] == offline(sources[:1], delta_t)
    assert requests.get(f"{url}/health", timeout=10).json()["decoders"] == MAX_DECODERS < LIMITS["max_delta_t"] + 1


def _half_sent(url: str) -> socket.socket:
    """A request whose body stops after 9 of the 100 bytes it announced, left open."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"text\": ")
    return sock


def test_half_sent_bodies_get_408_and_overload_503_at_once(served, sources):
    """Every request slot of the replica held by a client that never finishes its body: those get
    408 after body_timeout_s (they used to hold the slots for ever, and every later request
    waited behind them); meanwhile requests past the proxy's queue get 503 with Retry-After at
    once, and the queued ones are answered once the slots free."""
    url, target, offline = served
    assert target.spec.serve.retry_after_s == 1
    slow = [_half_sent(url) for _ in range(SLOTS)]
    try:
        time.sleep(0.5)    # every slow request has reached the replica

        def post(_):
            t0 = time.monotonic()
            r = requests.post(f"{url}/translate", json={"text": sources[0]}, timeout=30)
            return r, time.monotonic() - t0

        with ThreadPoolExecutor(QUEUED + 8) as pool:
            answers = list(pool.map(post, range(QUEUED + 8)))
        for sock in slow:
            reply = sock.recv(65536).decode()
            assert reply.startswith("HTTP/1.1 408"), reply
            assert "\r\nretry-after: 1\r\n" in reply.lower(), reply   # nothing decoded: safe to retry
            assert json.loads(reply.split("\r\n\r\n", 1)[1]) == {
                "error": f"request body not received within {BODY_TIMEOUT_S} s"}
    finally:
        for sock in slow:
            sock.close()
    rejected = [(r, s) for r, s in answers if r.status_code == 503]
    assert rejected and all(r.headers["Retry-After"] == "1" and s < BODY_TIMEOUT_S for r, s in rejected)
    served_ok = [r for r, _ in answers if r.status_code != 503]
    assert served_ok and all(r.status_code == 200 and r.json()["translations"] == offline(sources[:1])
                             for r in served_ok)


def test_serve_runs_with_the_request_timeout(served):
    from ray.serve.context import _get_global_client

    assert _get_global_client().http_config.request_timeout_s == 45


def test_offline_scoring_counts_and_logs_truncated_sources(served, sources, micro_run, caplog):
    """Offline (evaluate, eval) the same text is decoded truncated: counted in the row and logged."""
    from orchestrator.decoding import translate_and_score

    _, _, offline = served
    tok, at, nat = load_run_models(micro_run[0], "cpu")
    texts = [sources[0], _word_text(tok, sources, offline.max_tokens + 5)]
    lpd = decoders(at, nat, 1, 2)["lpd"]
    with caplog.at_level("WARNING", logger="imitate_orch"):
        row, hyps = translate_and_score(lpd, tok, texts, ["x", "y"], 4096, "cpu", at.cfg.max_positions)
    assert row["truncated_sources"] == 1 and len(hyps) == 2
    assert f"1 of 2 sources are over {offline.max_tokens} tokens" in caplog.text


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_no_response_names_a_server_path(served, sources, micro_run):
    url, _, _ = served
    responses = [requests.get(f"{url}/health", timeout=10),
                 requests.post(f"{url}/translate", json={"text": sources[0]}, timeout=60),
                 requests.post(f"{url}/translate", json={"text": "\ud800"}, timeout=60),
                 requests.post(f"{url}/translate", json={"text": "a", "nope": 1}, timeout=60),
                 requests.post(f"{url}/nowhere", json={}, timeout=10)]
    for r in responses:
        assert str(micro_run[0].parent) not in r.text, r.text
        assert not [s for s in _strings(r.json()) if os.path.isabs(s)], r.text
    assert responses[0].json()["model"]["source"] == "run_dir"


def test_json_with_a_charset_is_json(served, sources):
    url, _, offline = served
    r = requests.post(f"{url}/translate", data=f'{{"text": "{sources[0]}"}}'.encode(),
                      headers={"Content-Type": "Application/JSON; charset=utf-8"}, timeout=60)
    assert r.status_code == 200 and r.json()["translations"] == offline(sources[:1])


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
    assert res.output.split("\n")[:3] == [offline(texts[:2])[0], "", offline(texts[:2])[1]]
    # More lines than the server takes per request: sent in chunks of its limit.
    many = sources[: LIMITS["max_texts"] + 3]
    res = CliRunner().invoke(main, ["translate", "--url", url], input="\n".join(many))
    n = LIMITS["max_texts"]
    assert res.exit_code == 0 and res.output.splitlines() == offline(many[:n]) + offline(many[n:])
    res = CliRunner().invoke(main, ["translate", "--url", url, "--delta-t", "9", texts[0]])
    assert res.exit_code == 2 and "delta_t: must be between 0 and 4" in res.output
