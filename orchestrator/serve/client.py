"""Client of the Serve endpoint: `translate_remote` (Python) and `imitate-orch translate`.

Connection errors, 429, 500, 502 and 503 are retried with exponential backoff and jitter (a
replica that died mid-request, or a cluster still starting, answers so), waiting at least what
a Retry-After header asks (an overloaded server's 503); translation is idempotent, so a retry
is always safe. A request that timed out once the server had it (408 from Serve's
request_timeout_s, a gateway's 504, no answer within timeout_s) is not retried unless
`retry_timeouts`: the server may still be decoding it, and sending it again only adds to the
load that made it late. A 408 or 504 that carries Retry-After (our body deadline: nothing was
decoded) is retried like a 503. Other 4xx errors are the request's fault and raise
at once. When every attempt found nothing listening, the error says so (NO_SERVER).
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import requests

RETRY_STATUS = frozenset({429, 500, 502, 503})
TIMEOUT_STATUS = frozenset({408, 504})   # the server, or a gateway, gave up waiting for the answer
MAX_RETRY_AFTER_S = 60.0                 # a longer Retry-After is waited this long
TEXTS_PER_REQUEST = 32   # well under the server's default serve.max_texts (64)
NO_SERVER = "no server at {url} — start one with `imitate-orch serve RUN_DIR`"


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


def _refused(error: BaseException) -> bool:
    """Whether nothing listens at the address: requests wraps the OS's ConnectionRefusedError in
    urllib3's errors (as an argument, a `reason`, a cause), whose text alone would say it as
    "Max retries exceeded ... [Errno 111]"."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if isinstance(e, ConnectionRefusedError):
            return True
        if id(e) not in seen:
            seen.add(id(e))
            todo += [c for c in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args)
                     if isinstance(c, BaseException)]
    return False


def _retry_after_s(resp: requests.Response) -> float:
    """The Retry-After header's seconds (0 when absent, or an HTTP date: Serve sends seconds)."""
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(resp.headers.get("Retry-After", 0))))
    except ValueError:
        return 0.0


def translate_remote(url: str, texts: Sequence[str] | str, delta_t: int | None = None, *, retries: int = 5,
                     backoff_s: float = 0.2, max_backoff_s: float = 5.0, timeout_s: float = 60.0,
                     retry_timeouts: bool = False, session: requests.Session | None = None,
                     retry_log: RetryLog | None = None) -> dict:
    """POST texts (or one text) to URL/translate; returns the response JSON
    ({"translations": [...], "delta_t": k, "model": {...}}). Retries as the module says."""
    payload: dict = {"text": texts} if isinstance(texts, str) else {"texts": list(texts)}
    if delta_t is not None:
        payload["delta_t"] = delta_t
    post = (session or requests).post
    endpoint = url.rstrip("/") + "/translate"
    retried = RETRY_STATUS | TIMEOUT_STATUS if retry_timeouts else RETRY_STATUS
    for attempt in range(retries + 1):
        wait_s, refused = 0.0, False
        try:
            resp = post(endpoint, json=payload, timeout=timeout_s)
        except requests.ReadTimeout as e:  # sent, and no answer in time
            reason, status = f"{type(e).__name__}: {e}", None
            if not retry_timeouts:
                raise ServeRequestError(f"{endpoint}: no answer within {timeout_s:g} s (not retried)") from None
        except (requests.ConnectionError, requests.Timeout) as e:
            # Refused is retried too: a server still starting does not listen yet.
            reason, status, refused = f"{type(e).__name__}: {e}", None, _refused(e)
        else:
            if resp.status_code == 200:
                return resp.json()
            reason, status = f"HTTP {resp.status_code}: {_message(resp)}", resp.status_code
            if status not in retried and not (status in TIMEOUT_STATUS and "Retry-After" in resp.headers):
                raise ServeRequestError(reason, status)
            wait_s = _retry_after_s(resp)
        if retry_log is not None:
            retry_log.add(reason)
        if attempt == retries:
            if refused:
                raise ServeRequestError(f"{NO_SERVER.format(url=url)} (connection refused; gave up after "
                                        f"{retries + 1} attempt{'s' if retries else ''})")
            raise ServeRequestError(f"{endpoint}: gave up after {retries + 1} attempts; last: {reason}", status)
        time.sleep(max(wait_s, min(max_backoff_s, backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)))
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
