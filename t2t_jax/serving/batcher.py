"""Dynamic batching: sentences from concurrent requests gathered into one search.

Requests put their sentences in one queue. The batcher takes the oldest sentence's setting
(beam size and alpha: one program, one alpha per batch) and gathers the sentences of that
setting, up to `max_batch` of them or until the oldest has waited `max_wait_s`. The search
runs on one worker thread, so the event loop keeps taking requests, and the next batch
gathers while this one is searched. A sentence whose request went away (a client that
disconnected) is dropped from its batch, and the others are answered as usual.

An engine with `continuous` (greedy search in slots that refill as sentences finish, see
`continuous.py`) takes greedy sentences there instead, each as soon as a slot is free, once
more than a quarter of `max_batch` sentences are waiting or searched; below that load they
batch as above.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from t2t_jax.serving.continuous import SlotScheduler
from t2t_jax.serving.engine import Engine, Sentence


class QueueFull(Exception):
    """More sentences wait than the server holds: try again after `retry_after_s`."""

    def __init__(self, waiting: int, limit: int, retry_after_s: int):
        super().__init__(f"{waiting} sentences are waiting, the most this server queues is "
                         f"{limit}; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclasses.dataclass
class _Waiting:
    sentence: Sentence
    setting: tuple[int, float]  # (beam size, alpha)
    future: asyncio.Future
    arrived: float


@dataclasses.dataclass
class BatchRecord:
    """What one search did, for the server's metrics (continuous: sentences that took slots
    together, and the seconds of their admission and first advance)."""

    sentences: int
    seconds: float
    waited_s: float
    continuous: bool = False


class Batcher:
    """Gathers sentences into batches and searches them on one worker thread."""

    def __init__(self, engine: Engine, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[BatchRecord], None] = lambda record: None):
        self.engine = engine
        self.max_batch = engine.max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._arrival = asyncio.Event()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="search")
        self._task: asyncio.Task | None = None
        self._seconds_per_sentence = 0.01  # a running estimate, for Retry-After
        continuous = getattr(engine, "continuous", None)
        self._slots = (SlotScheduler(continuous, on_admit=self._on_admit) if continuous
                       else None)
        # The slots' program steps every slot, busy or not: under a light load a batch of the
        # waiting sentences' own rows bucket costs less a step (at 1 sentence, 1/6 on a CPU).
        self._continuous_from = max(2, self.max_batch // 4)
        self._searching = 0  # sentences in the batch being searched

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + (self._slots.waiting if self._slots else 0)

    def _on_admit(self, sentences: int, seconds: float, waited_s: float) -> None:
        self.on_batch(BatchRecord(sentences, seconds, waited_s, continuous=True))

    async def run_in_worker(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` on the search thread (warm-up compiles there, before serving)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._gather_and_search())
        if self._slots:
            self._slots.start()

    async def stop(self) -> None:
        """Ends the batcher once nothing waits (the server has finished its requests)."""
        while self._waiting and self._task and not self._task.done():  # a dead task drains nothing
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
        if self._slots:
            await asyncio.get_running_loop().run_in_executor(None, self._slots.stop)
        self._worker.shutdown(wait=True)

    def submit(self, sentences: Sequence[Sentence], beam_size: int, alpha: float
               ) -> list[asyncio.Future]:
        """Queues a request's sentences; each future gets its sentence's hypotheses."""
        waiting = self.queue_depth
        if waiting + len(sentences) > self.max_queue:
            retry = max(1, round(waiting * self._seconds_per_sentence))
            raise QueueFull(waiting, self.max_queue, retry)
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures = []
        load = len(self._waiting) + self._searching + (self._slots.pending if self._slots
                                                        else 0)
        continuous = self._slots and beam_size == 1 and load + len(sentences) > (
            self._continuous_from)
        for sentence in sentences:
            future = loop.create_future()
            if continuous:
                self._slots.submit(sentence, _resolver(loop, future))
            else:
                self._waiting.append(_Waiting(sentence, (beam_size, alpha), future, now))
            futures.append(future)
        self._arrival.set()
        return futures

    async def _next_batch(self) -> list[_Waiting]:
        while not self._waiting:
            self._arrival.clear()
            await self._arrival.wait()
        first = self._waiting[0]
        deadline = first.arrived + self.max_wait_s
        while self._count(first.setting) < self.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                break
        return self._take(first.setting)

    def _count(self, setting: tuple[int, float]) -> int:
        return sum(1 for w in self._waiting if w.setting == setting)

    def _take(self, setting: tuple[int, float]) -> list[_Waiting]:
        taken, kept = [], collections.deque()
        for waiting in self._waiting:
            if waiting.setting == setting and len(taken) < self.max_batch:
                taken.append(waiting)
            else:
                kept.append(waiting)
        self._waiting = kept
        return [w for w in taken if not w.future.done()]  # done: its request was cancelled

    async def _gather_and_search(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            beam_size, alpha = batch[0].setting
            start = time.perf_counter()
            self._searching = len(batch)
            try:
                results = await self.run_in_worker(
                    self.engine.translate, [w.sentence for w in batch], beam_size, alpha)
            except Exception as error:  # a bug in one batch must not end the server
                logging.exception("a batch of %d sentences failed", len(batch))
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(error)
                continue
            finally:
                self._searching = 0
            seconds = time.perf_counter() - start
            self._seconds_per_sentence = 0.8 * self._seconds_per_sentence + 0.2 * (
                seconds / len(batch))
            for waiting, hypotheses in zip(batch, results, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(hypotheses)
            self.on_batch(BatchRecord(len(batch), seconds, start - batch[0].arrived))


def _resolver(loop: asyncio.AbstractEventLoop, future: asyncio.Future
              ) -> Callable[[Any], None]:
    """A callback, for another thread, that gives `future` its result (or exception) on
    `loop`, unless the request went away."""
    def settle(value: Any) -> None:
        if future.done():
            return
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)

    return lambda value: loop.call_soon_threadsafe(settle, value)
