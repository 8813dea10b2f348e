"""Serve's pieces without a server: the client's retries (Retry-After, timeouts, connection
errors), the body deadline under a blocked event loop, a request failing in its batch. The
endpoint itself is tested in test_serve.py."""
from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
import requests

from orchestrator.serve import client
from orchestrator.serve.client import RetryLog, ServeRequestError, translate_remote

from helpers import free_port


def test_a_request_failing_in_its_batch_fails_alone():
    """decode_batch: a request whose texts raise gets the exception (its handler's 500); the
    requests batched with it, of its ΔT or another, still get their translations."""
    from orchestrator.serve.app import Translator

    replica = object.__new__(Translator.func_or_class)
    replica.batch_stats = {"count": 0, "requests": 0, "texts": 0, "max_requests": 0}
    calls = []

    def lpd(texts, delta_t):
        calls.append(len(texts))
        if "boom" in texts:
            raise RuntimeError("boom")
        return [f"{t}@{delta_t}" for t in texts]

    replica.lpd = lpd
    out = replica.decode_batch([(("a", "b"), 1), (("boom",), 1), (("c",), 2), (("d",), 1)])
    assert out[0] == ["a@1", "b@1"] and isinstance(out[1], RuntimeError) and out[2:] == [["c@2"], ["d@1"]]
    assert calls == [4, 2, 1, 1, 1]  # the ΔT 1 group at once, then one by one; ΔT 2 at once


def test_a_body_deadline_passed_while_decoding_blocked_the_loop_is_not_the_clients():
    """Decoding blocks the replica's event loop, on which the body's bytes are handed over: a
    body that arrived meanwhile must not get a 408 (nor a 200 the client never sent)."""
    from orchestrator.serve.app import ApiError, BodyLimit

    async def body(block_s: float | None):
        queue, limit = asyncio.Queue(), BodyLimit(None, max_bytes=100, timeout_s=0.2)

        async def replica_and_client():
            await asyncio.sleep(0.1)
            if block_s is None:   # a client that never sends its body
                return
            time.sleep(block_s)   # a batch decoding on the loop past the deadline
            await asyncio.sleep(0)  # the bytes are handed over in a later turn, after the timer
            queue.put_nowait({"type": "http.request", "body": b"{}", "more_body": False})

        task = asyncio.get_running_loop().create_task(replica_and_client())
        try:
            return await limit._read_in_time(queue.get)
        finally:
            await task

    assert asyncio.run(body(block_s=0.4)) == b"{}"
    with pytest.raises(ApiError, match="request body not received within 0.2 s"):
        asyncio.run(body(block_s=None))


class _Answers:
    """A requests.Session whose post() gives the next of `answers`: (status, headers) or an exception."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), 0

    def post(self, *_, **__):
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        r = requests.Response()
        r.status_code = answer[0]
        if answer[1] is not None:
            r.headers["Retry-After"] = answer[1]
        r._content = json.dumps({"translations": ["x"]} if answer[0] == 200 else {"error": "e"}).encode()
        return r


def test_client_honours_retry_after_and_does_not_retry_timeouts_by_default(monkeypatch):
    sleeps = []
    monkeypatch.setattr(client, "time", SimpleNamespace(sleep=sleeps.append))
    ok = (200, "0")
    session = _Answers((503, "2"), (429, "1"), ok)
    assert translate_remote("http://x", "a", backoff_s=0.01, session=session)["translations"] == ["x"]
    assert session.calls == 3 and sleeps[0] >= 2 and sleeps[1] >= 1
    # The server (408: Serve's request_timeout_s), a gateway (504) or the client (no answer in
    # time) gave up: the server may still be decoding it.
    for timed_out in ((408, None), (504, None), requests.ReadTimeout("slow")):
        session = _Answers(timed_out, ok)
        with pytest.raises(ServeRequestError):
            translate_remote("http://x", "a", backoff_s=0.01, session=session)
        assert session.calls == 1
        session = _Answers(timed_out, ok)
        assert translate_remote("http://x", "a", backoff_s=0.01, retry_timeouts=True, session=session)
        assert session.calls == 2
    # A timeout that says Retry-After (the body deadline: nothing was decoded) is retried.
    for timed_out in ((408, "1"), (504, "0")):
        session = _Answers(timed_out, ok)
        assert translate_remote("http://x", "a", backoff_s=0.01, session=session)["translations"] == ["x"]
        assert session.calls == 2


def test_client_retries_then_gives_up_on_connection_errors():
    retry_log, url = RetryLog(), f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServeRequestError, match=f"^no server at {url} — start one with .*gave up after 3 attempts"):
        translate_remote(url, "a", retries=2, backoff_s=0.01, retry_log=retry_log)
    assert len(retry_log.failures) == 3 and all("ConnectionError" in f for f in retry_log.failures)
