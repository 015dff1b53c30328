"""`t2t-jax loadtest`: bounded load on a local translation server, at several concurrencies.

Each of `concurrency` clients posts one request at a time (`sentences_per_request` lines of the
input, taken in turn) until `requests` have been answered. Reported per concurrency:
sentences/s and output tokens/s over the whole run, and request latency p50/p90/p99. Against a
second server (`baseline_url`, the same model with `--max_batch 1`) on the same inputs, it also
reports the speedup of dynamic batching. Only loopback addresses are accepted: this is a
benchmark of one's own server, never load on someone else's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import time
import urllib.parse
from collections.abc import Sequence

import numpy as np

MAX_REQUESTS = 100_000  # the bound on one run's traffic


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """One concurrency's figures."""

    concurrency: int
    requests: int
    errors: int
    seconds: float
    sentences_per_s: float
    tokens_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float


def check_loopback(url: str) -> str:
    """`url` if its host is this machine (localhost, 127.0.0.0/8, ::1); else a one-line error."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise ValueError(f"loadtest sends load only to this machine: {url!r} is not a loopback "
                         f"address (use http://127.0.0.1:PORT)")
    return url.rstrip("/")


async def _run_one(url: str, lines: Sequence[str], concurrency: int, requests: int,
                   per_request: int, body_extra: dict) -> LoadResult:
    import aiohttp

    latencies, tokens, errors = [], [0], [0]
    next_request = iter(range(requests))
    endpoint = f"{url}/v1/translate"

    async def client(session):
        for number in next_request:
            first = number * per_request
            texts = [lines[(first + k) % len(lines)] for k in range(per_request)]
            start = time.perf_counter()
            async with session.post(endpoint, json={"text": texts, **body_extra}) as response:
                answer = await response.json()
            latencies.append(time.perf_counter() - start)
            if response.status != 200:
                errors[0] += 1
                continue
            tokens[0] += sum(t["tokens"] for t in answer["translations"])

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    done = requests - errors[0]
    p50, p90, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 90, 99))
    return LoadResult(concurrency, requests, errors[0], seconds,
                      done * per_request / seconds, tokens[0] / seconds, p50, p90, p99)


def run_load(url: str, lines: Sequence[str], concurrencies: Sequence[int], requests: int,
             per_request: int = 1, body_extra: dict | None = None) -> list[LoadResult]:
    """The figures of each concurrency in turn, on a server at loopback `url`."""
    url = check_loopback(url)
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"--requests must be between 1 and {MAX_REQUESTS}, got {requests}")
    if not lines:
        raise ValueError("the input has no lines to send")
    return [asyncio.run(_run_one(url, lines, c, requests, per_request, body_extra or {}))
            for c in concurrencies]


def table(results: Sequence[LoadResult], baseline: Sequence[LoadResult] | None = None) -> str:
    """The results as a Markdown table; with `baseline`, the speedup in sentences/s."""
    head = "| concurrency | requests | errors | sentences/s | tokens/s | p50 ms | p90 ms | p99 ms |"
    rule = "| --- | --- | --- | --- | --- | --- | --- | --- |"
    if baseline:
        head += " max_batch 1 sentences/s | speedup |"
        rule += " --- | --- |"
    rows = [head, rule]
    for n, r in enumerate(results):
        row = (f"| {r.concurrency} | {r.requests} | {r.errors} | {r.sentences_per_s:.1f} | "
               f"{r.tokens_per_s:.1f} | {r.p50_ms:.1f} | {r.p90_ms:.1f} | {r.p99_ms:.1f} |")
        if baseline:
            base = baseline[n].sentences_per_s
            row += f" {base:.1f} | {r.sentences_per_s / base:.2f}x |"
        rows.append(row)
    return "\n".join(rows)
