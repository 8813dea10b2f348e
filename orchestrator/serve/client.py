"""Client of the Serve endpoint: `translate_remote` (Python) and `imitate-orch translate`.

Connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter
(a replica that died mid-request, or a cluster still starting, answers so); translation is
idempotent, so a retry is always safe. 4xx errors are the request's fault and raise at once.
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import requests

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
TEXTS_PER_REQUEST = 32   # well under the server's default serve.max_texts (64)


class ServeRequestError(Exception):
    """The server rejected the request (status 4xx), or every retry failed (status None or 5xx)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class RetryLog:
    """Counts attempts that failed and were retried (thread-safe; share one across threads)."""

    failures: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str) -> None:
        with self._lock:
            self.failures.append(reason)


def _message(resp: requests.Response) -> str:
    try:
        return str(resp.json().get("error", resp.text))
    except (ValueError, AttributeError):
        return resp.text.strip()[:200] or resp.reason


def translate_remote(url: str, texts: Sequence[str] | str, delta_t: int | None = None, *, retries: int = 5,
                     backoff_s: float = 0.2, max_backoff_s: float = 5.0, timeout_s: float = 60.0,
                     session: requests.Session | None = None, retry_log: RetryLog | None = None) -> dict:
    """POST texts (or one text) to URL/translate; returns the response JSON
    ({"translations": [...], "delta_t": k, "model": {...}}). Retries as the module says."""
    payload: dict = {"text": texts} if isinstance(texts, str) else {"texts": list(texts)}
    if delta_t is not None:
        payload["delta_t"] = delta_t
    post = (session or requests).post
    endpoint = url.rstrip("/") + "/translate"
    for attempt in range(retries + 1):
        try:
            resp = post(endpoint, json=payload, timeout=timeout_s)
        except (requests.ConnectionError, requests.Timeout) as e:
            reason, status = f"{type(e).__name__}: {e}", None
        else:
            if resp.status_code == 200:
                return resp.json()
            reason, status = f"HTTP {resp.status_code}: {_message(resp)}", resp.status_code
            if status not in RETRY_STATUS:
                raise ServeRequestError(reason, status)
        if retry_log is not None:
            retry_log.add(reason)
        if attempt == retries:
            raise ServeRequestError(f"{endpoint}: gave up after {retries + 1} attempts; last: {reason}", status)
        time.sleep(min(max_backoff_s, backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def server_max_texts(session: requests.Session, url: str, timeout_s: float = 10.0) -> int | None:
    """The server's texts-per-request limit from /health (None if it doesn't say)."""
    try:
        return int(session.get(url.rstrip("/") + "/health", timeout=timeout_s).json()["limits"]["max_texts"])
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return None


def translate_lines(url: str, lines: Sequence[str], delta_t: int | None = None,
                    chunk: int = TEXTS_PER_REQUEST, **kw) -> list[str]:
    """One translation per line, order kept; blank lines give blank outputs (not sent).
    Sent `chunk` lines per request, fewer if the server's limit is lower."""
    out = [""] * len(lines)
    todo = [i for i, line in enumerate(lines) if line.strip()]
    with requests.Session() as session:
        chunk = min(chunk, server_max_texts(session, url) or chunk)
        for k in range(0, len(todo), chunk):
            idx = todo[k: k + chunk]
            got = translate_remote(url, [lines[i] for i in idx], delta_t, session=session, **kw)["translations"]
            for i, t in zip(idx, got):
                out[i] = t
    return out
