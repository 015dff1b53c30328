"""`t2t-jax serve`: an HTTP translation server (Starlette on uvicorn) over an engine, with
dynamic batching (`batcher.py`) and Prometheus metrics (`metrics.py`).

    POST /v1/translate  {"text": [str, ...], "beam_size": int, "alpha": float, "nbest": int,
                         "target_prefix": [str, ...]}   (only "text" is required)
                        -> {"translations": [{"text", "log_prob", "score", "tokens",
                                              "nbest": [...], "warnings": [...]}, ...]}
    GET /health         200 once every shape is compiled (503 while warming up)
    GET /metrics        Prometheus text

Every mistake in a request is a 4xx with {"error": "one line"}; a full queue is a 503 with
Retry-After. SIGTERM stops taking connections, answers the requests in flight and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import signal
import socket
import time
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from t2t_jax.serving.batcher import Batcher, QueueFull
from t2t_jax.serving.engine import Engine
from t2t_jax.serving.metrics import ServerMetrics

FIELDS = ("text", "beam_size", "alpha", "nbest", "target_prefix")


class BadRequest(ValueError):
    """A mistake in a request: its status (4xx) and one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """The server's flags: defaults of a request's search, and its limits."""

    beam_size: int = 4
    alpha: float = 0.6
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_request_sentences: int = 256


@dataclasses.dataclass(frozen=True)
class TranslateRequest:
    texts: list[str]
    beam_size: int
    alpha: float
    nbest: int
    prefixes: list[str] | None


def _typed(body: dict, key: str, kind: type, default: Any) -> Any:
    value = body.get(key, default)
    number = kind is float and isinstance(value, int)
    if isinstance(value, bool) or not (isinstance(value, kind) or number):
        raise BadRequest(f"'{key}' must be {'a number' if kind is float else 'an integer'}, "
                         f"got {json.dumps(value)}")
    return float(value) if kind is float else value


def _strings(body: dict, key: str) -> list[str]:
    value = body[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"'{key}' must be a list of strings")
    return value


def parse_request(body: Any, engine: Engine, settings: ServerSettings) -> TranslateRequest:
    """A request's JSON body, checked: every mistake is a BadRequest naming the fix."""
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object: {"text": ["a sentence", ...]}')
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field '{unknown[0]}'; the fields are {', '.join(FIELDS)}")
    if "text" not in body:
        raise BadRequest('\'text\' is required: {"text": ["a sentence", ...]}')
    texts = _strings(body, "text")
    if not texts:
        raise BadRequest("'text' is empty: send at least one sentence")
    if len(texts) > settings.max_request_sentences:
        raise BadRequest(f"{len(texts)} sentences in one request, over this server's "
                         f"--max_request_sentences {settings.max_request_sentences}; split it",
                         status=413)
    beam_size = _typed(body, "beam_size", int, settings.beam_size)
    if beam_size not in engine.beam_sizes:
        raise BadRequest(f"beam_size {beam_size} is not served; this server compiled "
                         f"{', '.join(map(str, engine.beam_sizes))} (--beam_sizes)")
    alpha = _typed(body, "alpha", float, settings.alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise BadRequest(f"'alpha' must be a finite number at least 0, got {alpha}")
    nbest = _typed(body, "nbest", int, 1)
    if not 1 <= nbest <= beam_size:
        raise BadRequest(f"nbest {nbest} needs 1 <= nbest <= beam_size ({beam_size})")
    prefixes = None
    if "target_prefix" in body:
        prefixes = _strings(body, "target_prefix")
        if len(prefixes) != len(texts):
            raise BadRequest(f"'target_prefix' has {len(prefixes)} entries and 'text' "
                             f"{len(texts)}: give one per sentence (\"\" for none)")
    return TranslateRequest(texts, beam_size, alpha, nbest, prefixes)


def _hypothesis(h) -> dict[str, Any]:
    """decode --format jsonl's fields of one hypothesis."""
    return {"text": h.text, "log_prob": round(h.log_prob, 6), "score": round(h.score, 6),
            "tokens": len(h.ids) + 1}


def translation(hypotheses: Sequence, nbest: int, cut: bool, max_source_length: int
                ) -> dict[str, Any]:
    """One sentence's answer: its best hypothesis, the n-best when asked, and warnings."""
    entry = _hypothesis(hypotheses[0])
    if nbest > 1:
        entry["nbest"] = [_hypothesis(h) for h in hypotheses[:nbest]]
    entry["warnings"] = ([f"the input is over {max_source_length} tokens and was cut to them"]
                         if cut else [])
    return entry


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class TranslationService:
    """The routes' handlers over one engine, its batcher and its metrics."""

    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.warm = False
        self.batcher = Batcher(engine, settings.max_wait_ms / 1000, settings.max_queue)
        self.metrics = ServerMetrics(engine.max_batch, lambda: self.batcher.queue_depth)
        self.batcher.on_batch = self.metrics.record_batch

    async def translate(self, request: Request) -> Response:
        start = time.perf_counter()
        response = await self._translate(request)
        self.metrics.requests.labels(str(response.status_code)).inc()
        self.metrics.latency.observe(time.perf_counter() - start)
        return response

    async def _translate(self, request: Request) -> Response:
        if not self.warm:
            return _error("the server is still compiling; retry soon", 503,
                          {"Retry-After": "5"})
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _error(f"the body is not JSON ({error})", 400)
        try:
            parsed = parse_request(body, self.engine, self.settings)
            sentences = self.engine.encode(parsed.texts, parsed.prefixes)
            futures = self.batcher.submit(sentences, parsed.beam_size, parsed.alpha)
        except BadRequest as error:
            return _error(str(error), error.status)
        except QueueFull as error:
            return _error(str(error), 503, {"Retry-After": str(error.retry_after_s)})
        except ValueError as error:  # the engine's: an unknown symbol, a prefix with no room
            return _error(str(error), 400)
        results = await asyncio.gather(*futures)
        answers = [translation(h, parsed.nbest, s.cut, self.engine.max_source_length)
                   for h, s in zip(results, sentences, strict=True)]
        self.metrics.sentences.inc(len(answers))
        self.metrics.tokens.inc(sum(a["tokens"] for a in answers))
        return JSONResponse({"translations": answers})

    async def health(self, request: Request) -> Response:
        if self.warm:
            return JSONResponse({"status": "ok", "engine": self.engine.name})
        return _error("compiling", 503)

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4")

    async def warm_up(self) -> None:
        """Compiles on the search thread, after start-up, so /health can answer meanwhile."""
        start = time.perf_counter()
        summary = await self.batcher.run_in_worker(self.engine.warm_up)
        self.metrics.compile_seconds.set(time.perf_counter() - start)
        self.warm = True
        print(f"t2t-jax serve: {summary}; ready", flush=True)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        self.batcher.start()
        warming = asyncio.get_running_loop().create_task(self.warm_up())
        yield
        warming.cancel()
        await self.batcher.stop()


def create_app(engine: Engine, settings: ServerSettings = ServerSettings()) -> Starlette:
    """The ASGI app: the routes above over `engine`; it compiles (warm-up) after start-up on
    the search thread, and /health says when that is done."""
    service = TranslationService(engine, settings)
    routes = [Route("/v1/translate", service.translate, methods=["POST"]),
              Route("/health", service.health, methods=["GET"]),
              Route("/metrics", service.metrics_text, methods=["GET"])]
    return Starlette(routes=routes, lifespan=service.lifespan)


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), so the port is known, and taken, before the
    server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror}); pick another "
                         f"--port") from None
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    return sock


def serve(app: Starlette, host: str, port: int) -> None:
    """Serves `app` until SIGTERM or SIGINT, then finishes the requests in flight; returns
    normally (exit status 0) after a signal."""
    import uvicorn

    sock = listening_socket(host, port)
    host, port = sock.getsockname()[:2]
    print(f"t2t-jax serve: listening on http://{host}:{port} (compiling; GET /health says "
          f"when it is ready)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=30,
                                           lifespan="on"))
    # uvicorn raises the signal again once it has shut down; this handler keeps that from
    # killing the process, so a stop by SIGTERM exits 0.
    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stopped.append(number))
    server.run(sockets=[sock])
    if stopped:
        logging.info("stopped by signal %s after answering the requests in flight", stopped[0])
    print("t2t-jax serve: stopped", flush=True)
