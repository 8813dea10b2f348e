"""The Ray Serve application: a FastAPI ingress deployment holding the NAT student, the AT
rescorer and the tokenizer, translating with Length Parallel Decoding (LPD).

    POST /translate  {"text": "..."} or {"texts": [...]}, optional "delta_t"
                     -> {"translations": [...], "delta_t": k, "model": {"job", "run_id", "source"}}
                        header Server-Timing: decode;dur=ms (its batch's decoding), app;dur=ms
    GET  /health     -> {"status": "ok", "model": ..., "replica": ..., "limits": ..., "batches": ...,
                         "decoders": LPD decoders held, "device": "cpu" | "cuda",
                         "cpu_fast": the CPU path's mode (int8, bf16; null: fp32 or a GPU)}
    GET  /docs       OpenAPI docs (/openapi.json)

Requests from all clients are batched with `@serve.batch` (one batch item per request); a
batch decodes on the replica's event loop, so requests arriving meanwhile form the next. A
batch can mix ΔT values: its requests are grouped by ΔT and each group is decoded by the same
`translate` + LPD decoder as offline evaluation, so all LPD candidates of a group go through
one NAT pass and one AT rescoring pass (split only when a group exceeds eval.batch_tokens =
sentences × longest × (2ΔT+1)). Results equal offline decoding of the same texts.

Bad input never becomes a 500: the body size is checked before parsing (Content-Length and
the streamed bytes; -> 413), and a body not received within body_timeout_s gets 408, so slow
clients cannot hold the replica's request slots; then the Content-Type (anything but
application/json -> 415), the body is parsed here (malformed JSON -> 400), validated by a
strict pydantic model (-> 422), then each text (not UTF-8 encodable, blank, over max_chars or
over the model's source tokens -> 422), ΔT, and the request's decoding cost, source tokens ×
(2ΔT+1), against max_lpd_tokens (-> 422). All of this runs in the request's own handler,
before it joins a batch, so a bad request fails alone. Every error is JSON {"error": "..."};
none names a file path. Overload is Serve's (server.py): 503 with Retry-After past
max_queued_requests waiting, 408 past request_timeout_s.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import unicodedata
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

APP_NAME = "imitate-nat"
# LPD decoders kept per replica, one per ΔT, least recently used dropped first: on a GPU each
# holds its CUDA graphs (imitate_nat/graphs.py, capped too).
MAX_DECODERS = 4
# A body deadline that fired more than TIMER_SLACK_S late passed while decoding blocked the
# event loop: LOOP_GRACE_S more (BodyLimit._read_in_time).
TIMER_SLACK_S, LOOP_GRACE_S = 0.05, 1.0
log = logging.getLogger("ray.serve")  # Serve's logger: lines go to the replica's log file


class ApiError(Exception):
    """A client error with its HTTP status (and headers); rendered as {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class TranslateRequest(BaseModel):
    # strict: "3" is not a ΔT and 5 is not a text; unknown keys are typos, not options.
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | None = Field(None, description="One text to translate.")
    texts: list[str] | None = Field(None, description="Several texts, translated in order.")
    delta_t: int | None = Field(None, description="LPD: lengths T̂-ΔT … T̂+ΔT (default: the job's eval.delta_t).")

    @model_validator(mode="after")
    def _one_of(self) -> TranslateRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        return self


class TranslateResponse(BaseModel):
    translations: list[str]
    delta_t: int
    model: dict[str, Any]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(errors: list[dict]) -> str:
    parts = []
    for e in errors:
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in e.get("loc", ()) if p != "body")
        loc = loc.replace(".[", "[")
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


class BodyLimit:
    """ASGI middleware: read the whole body before anything parses it, and reject one over
    `max_bytes` with 413 (the declared Content-Length first, then the streamed bytes: chunked
    uploads declare none) or not received within `timeout_s` with 408: a request holds one of
    the replica's slots while its body trickles in. Hands the app the buffered body."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check_declared(scope)
            body = await self._read_in_time(receive)
        except ApiError as e:
            return await _error(e.status, e.message, e.headers)(scope, receive, send)
        if body is None:  # the client went away
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check_declared(self, scope) -> None:
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is None:
            return
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
        if n > self.max_bytes:
            raise self._too_big()

    async def _read_in_time(self, receive) -> bytes | None:
        """The body, None if the client went away, or ApiError(408) past the deadline. Decoding
        blocks this event loop, and the body's bytes are handed over on it: a deadline that
        passed while the loop was blocked is the replica's delay, not the client's (the bytes
        may be waiting), and gets LOOP_GRACE_S more."""
        loop, body = asyncio.get_running_loop(), bytearray()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    return await self._read(receive, body)
            except TimeoutError:
                if loop.time() - deadline < TIMER_SLACK_S:   # fired on time: the client is slow
                    # ...or the bytes are stuck between Serve's proxy and this replica (a busy
                    # node, a replica being replaced): nothing was decoded, so Retry-After tells
                    # the client a retry is safe, unlike Serve's request_timeout_s 408.
                    raise ApiError(408, f"request body not received within {self.timeout_s:g} s",
                                   {"Retry-After": "1"}) from None
                deadline = loop.time() + LOOP_GRACE_S

    async def _read(self, receive, body: bytearray) -> bytes | None:
        """Reads on into `body` (kept when a deadline interrupts)."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                raise self._too_big()
            if not message.get("more_body", False):
                return bytes(body)

    def _too_big(self) -> ApiError:
        return ApiError(413, f"request body over the limit of {self.max_bytes} bytes")


def parse_request(body: bytes) -> TranslateRequest:
    """Bytes -> TranslateRequest, or ApiError(400) for malformed JSON / 422 for a bad shape."""
    if not body.strip():
        raise ApiError(400, 'empty request body: send a JSON object like {"text": "..."}')
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(422, f'the body must be a JSON object like {{"text": "..."}}, got {type(data).__name__}')
    try:
        return TranslateRequest.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, _validation_message(e.errors())) from None


def check_content_type(value: str | None) -> None:
    """ApiError(415) unless the body is declared JSON. Browsers send text/plain, form and
    multipart bodies cross-site without a CORS preflight: requiring application/json keeps a
    web page from making its visitor's browser POST to a server on localhost."""
    if (value or "").split(";", 1)[0].strip().lower() != "application/json":
        shown = (value or "none")[:100]
        raise ApiError(415, f"Content-Type must be application/json, got '{shown}'")


# Characters that carry nothing to translate: whitespace (str.isspace also covers NBSP, U+3000
# and the line separators), controls (Cc: NUL, ESC, ...) and format characters (Cf: zero-width
# space and joiners, BOM, bidirectional marks, soft hyphen, tag characters).
_INVISIBLE = frozenset({"Cc", "Cf"})


def is_blank(text: str) -> bool:
    return all(c.isspace() or unicodedata.category(c) in _INVISIBLE for c in text)


def check_limits(req: TranslateRequest, limits: dict, default_delta_t: int,
                 token_counts: Callable[[list[str]], list[int]]) -> tuple[list[str], int]:
    """The request's texts and ΔT, or ApiError(422) naming the field and the limit.
    `token_counts`: each text's source tokens (the tokenizer), compared with limits["max_tokens"]:
    past it offline decoding would truncate the source, which a 200 must never hide. Their sum
    × (2ΔT+1) is what decoding the request costs, compared with limits["max_lpd_tokens"]."""
    field = "text" if req.text is not None else "texts"
    texts = [req.text] if req.text is not None else req.texts
    if not texts:
        raise ApiError(422, "texts: must contain at least one text")
    if len(texts) > limits["max_texts"]:
        raise ApiError(422, f"texts: {len(texts)} texts, the limit is {limits['max_texts']} per request")
    wheres = [field if field == "text" else f"texts[{i}]" for i in range(len(texts))]
    for where, t in zip(wheres, texts):
        try:
            # JSON escapes can spell a lone surrogate ("\ud800"), which is no character: the
            # tokenizer would raise on it.
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(422, f"{where}: not valid Unicode (lone surrogate U+{ord(t[e.start]):04X} "
                                f"at character {e.start})") from None
        if is_blank(t):
            raise ApiError(422, f"{where}: empty text (nothing but whitespace, control or format characters)")
        if len(t) > limits["max_chars"]:
            raise ApiError(422, f"{where}: {len(t)} characters, the limit is {limits['max_chars']}")
    counts = token_counts(texts)
    for where, n in zip(wheres, counts):
        if n == 0:  # e.g. only U+FFFD, which the tokenizer drops: it would translate to ""
            raise ApiError(422, f"{where}: empty text (no token to translate)")
        if n > limits["max_tokens"]:
            raise ApiError(422, f"{where}: {n} tokens, the limit is {limits['max_tokens']} "
                                f"(the model's positions, less one for end of sentence)")
    delta_t = default_delta_t if req.delta_t is None else req.delta_t
    if not 0 <= delta_t <= limits["max_delta_t"]:
        raise ApiError(422, f"delta_t: must be between 0 and {limits['max_delta_t']}, got {delta_t}")
    cost = sum(counts) * (2 * delta_t + 1)
    if cost > limits["max_lpd_tokens"]:
        raise ApiError(422, f"{field}: {sum(counts)} source tokens × {2 * delta_t + 1} LPD candidates (ΔT {delta_t}) "
                            f"= {cost}, the limit is {limits['max_lpd_tokens']} per request (max_lpd_tokens): "
                            f"send fewer texts or a smaller delta_t")
    return texts, delta_t


def build_app(translator: Translator) -> FastAPI:
    """The HTTP API of one replica, bound to its Translator (built at replica start, so the
    limits come from the job's serve section)."""
    app = FastAPI(title="imitate-NAT translation", version="1",
                  description="Non-autoregressive translation with Length Parallel Decoding (imitate-NAT).")
    app.add_middleware(BodyLimit, max_bytes=translator.limits["max_body_bytes"], timeout_s=translator.body_timeout_s)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return _error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return _error(422, _validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        # A bug or a dying replica, never the client's input: 500, and clients may retry.
        return _error(500, f"internal error: {type(exc).__name__}")

    schema = {"content": {"application/json": {"schema": TranslateRequest.model_json_schema()}}, "required": True}
    errors = {s: {"description": d, "content": {"application/json": {"example": {"error": "..."}}}}
              for s, d in ((400, "malformed JSON"), (408, "body not received in time"), (413, "body too large"),
                           (415, "Content-Type is not application/json"), (422, "invalid request or over a limit"))}

    @app.post("/translate", response_model=TranslateResponse, openapi_extra={"requestBody": schema},
              responses=errors)
    async def translate(request: Request, response: Response):
        """Translate one text or a list of texts with NAT + LPD."""
        t0 = time.perf_counter()
        check_content_type(request.headers.get("content-type"))
        req = parse_request(await request.body())
        texts, delta_t = check_limits(req, translator.limits, translator.default_delta_t, translator.token_counts)
        translations, decode_ms = await translator.translate_batch((tuple(texts), delta_t))
        if isinstance(translations, Exception):  # this request's own failure (decode_batch)
            raise translations
        # Where the time went, for clients and bench/serve_load.py (W3C Server-Timing): the
        # decoding of the batch this request was in, and this handler from its start to here
        # (validation, tokenizing for the limits, waiting for and decoding the batch). What a
        # client measures beyond `app` is Serve's HTTP proxy and the hop to this replica.
        app_ms = (time.perf_counter() - t0) * 1000
        response.headers["Server-Timing"] = f"decode;dur={decode_ms:.2f}, app;dur={app_ms:.2f}"
        return {"translations": translations, "delta_t": delta_t, "model": translator.model_info}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": translator.model_info, "replica": translator.replica,
                "limits": translator.limits, "default_delta_t": translator.default_delta_t,
                "device": translator.device, "cpu_fast": translator.cpu_fast,
                "batches": translator.batch_stats, "decoders": translator.lpd_decoder.cache_info().currsize}

    return app


@serve.deployment(name="Translator")
@serve.ingress()
class Translator:
    """One replica: loads the models once, then answers batched LPD requests."""

    def __init__(self, source, serve_cfg: dict, eval_cfg: dict):
        import torch

        from .target import load_models

        gpu = serve_cfg.get("gpus_per_replica", 0) > 0 and torch.cuda.is_available()
        from ..decoding import for_device

        self.device = "cuda" if gpu else "cpu"
        self.tok, at, nat = load_models(source, self.device)
        # A registered model from before eval.cpu_fast existed holds no such setting: its default.
        self.at, self.nat, self.cpu_fast = for_device(at, nat, self.device, eval_cfg.get("cpu_fast", "auto"))
        self.model_info = source.describe()
        self.limits = {k: serve_cfg[k] for k in ("max_texts", "max_chars", "max_delta_t", "max_body_bytes",
                                                 "max_lpd_tokens")}
        self.body_timeout_s = serve_cfg["body_timeout_s"]
        self.length_ratio = serve_cfg["length_bucket_ratio"] if self.device == "cpu" else None
        # Source tokens + EOS fill at most the positional table (translate's max_src_len).
        self.limits["max_tokens"] = self.at.cfg.max_positions - 1
        self.default_delta_t = eval_cfg["delta_t"]
        self.eval_cfg = eval_cfg
        self.lpd_decoder = functools.lru_cache(maxsize=MAX_DECODERS)(self._new_lpd_decoder)  # ΔT -> (decoder, cost)
        self.batch_stats = {"count": 0, "requests": 0, "texts": 0, "max_requests": 0}
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()
        self.translate_batch.set_max_batch_size(serve_cfg["max_batch_size"])
        self.translate_batch.set_batch_wait_timeout_s(serve_cfg["batch_wait_timeout_s"])

    def __serve_build_asgi_app__(self):
        return build_app(self)

    def _new_lpd_decoder(self, delta_t: int) -> tuple:
        """The evaluate stage's LPD decoder and its batching cost factor."""
        from ..decoding import decoders

        e = self.eval_cfg
        return decoders(self.at, self.nat, e["beam_size"], delta_t, e["length_penalty"])["lpd"]

    def lpd(self, texts: list[str], delta_t: int) -> list[str]:
        """The evaluate stage's LPD decoder and `translate`, on a CPU in length buckets (the same
        translations offline, batched alike: README, "Decoding on a CPU")."""
        from imitate_nat.translate import translate

        decoder, cost = self.lpd_decoder(delta_t)
        return translate(texts, self.tok, decoder, batch_tokens=self.eval_cfg["batch_tokens"], device=self.device,
                         max_src_len=self.at.cfg.max_positions, cost_factor=cost, max_length_ratio=self.length_ratio)

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tok.encode_batch(texts)]

    def decode_batch(self, items: list[tuple[tuple[str, ...], int]]) -> list[list[str] | Exception]:
        """One output list per request, or the exception its texts raised; requests grouped by
        ΔT, each group decoded at once."""
        out: list = [[] for _ in items]
        by_delta = defaultdict(list)
        for i, (_, delta_t) in enumerate(items):
            by_delta[delta_t].append(i)
        for delta_t, idx in by_delta.items():
            try:
                hyps = self.lpd([t for i in idx for t in items[i][0]], delta_t)
            except Exception:
                # Texts are validated before they join a batch, so this is a bug or the device
                # (e.g. out of memory); either way it must not fail every request batched with
                # the culprit: decode them one by one, and only those that fail alone get a 500.
                log.exception("a batch of %d requests (ΔT %d) failed; decoding them one by one", len(idx), delta_t)
                for i in idx:
                    try:
                        out[i] = self.lpd(list(items[i][0]), delta_t)
                    except Exception as e:  # handed to that request's own handler
                        out[i] = e
                continue
            pos = 0
            for i in idx:
                out[i] = hyps[pos: pos + len(items[i][0])]
                pos += len(items[i][0])
        s = self.batch_stats
        s["count"] += 1
        s["requests"] += len(items)
        s["texts"] += sum(len(t) for t, _ in items)
        s["max_requests"] = max(s["max_requests"], len(items))
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)  # reset from the job in __init__
    async def translate_batch(self, items: list[tuple[tuple[str, ...], int]]) -> list[tuple[list[str] | Exception, float]]:
        """Each request's decode_batch result, with the batch's decoding milliseconds."""
        # Decoded on the replica's user event loop (Serve runs it in a thread of its own), not
        # in a worker thread: requests arriving meanwhile wait and then form the next batch
        # together. With a worker thread, @serve.batch would seal the next batch from the first
        # arrivals while this one decodes, and batches would stay small (BENCHMARKS.md, Serve).
        t0 = time.perf_counter()
        out = self.decode_batch(items)
        ms = (time.perf_counter() - t0) * 1000
        return [(result, ms) for result in out]
