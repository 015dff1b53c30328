"""Continuous batching for greedy search: a fixed set of rows ("slots") decodes step after
step, and a sentence takes a free slot as soon as one frees, instead of waiting for the
longest output of a batch to end (Orca's iteration-level scheduling, Yu et al. 2022).

A batch of 32 short sentences with one that runs to its length limit costs 3x the steps its
average needs; here a slot that has emitted EOS is answered and refilled at the next exit of
the device loop. Two programs run on the device, both compiled before serving:
- `admit`: encodes new sentences and writes their cross-attention keys and values into free
  slots (one program per power of two of new sentences);
- `advance`: greedy steps of every slot, until one finishes or `max_steps` have run.

Rows share one key/value ring cache (see `model.attention`): each row's position is the step
count less the step it was admitted at. The outputs are greedy search's: the same tokens,
log-probs within float rounding, the same length limit for each sentence as `decode` alone.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2t_jax import decode, search
from t2t_jax.data.batching import bucket_length
from t2t_jax.data.tokenizer import EOS_ID, PAD_ID
from t2t_jax.model.models import decode_step, init_cache
from t2t_jax.serving.engine import WARM_UP_TOKEN, Sentence, powers_of_two_up_to

Array = jax.Array
Done = Callable[[list[decode.Hypothesis] | BaseException], None]


def _admitted(running: Any, new: Any, slots: Array, step: Array) -> Any:
    """The running cache with `new`'s sentences in rows `slots` (padding slots, == rows, are
    dropped): their cross-attention keys and values (over a source length bucket, padded to
    the running cache's), and their first step, `step`. The step counters every row shares stay
    the running cache's, and so do the self-attention rings, which `new` holds for one position
    only: a newly started row sees none of its ring's old entries."""
    def merge(path, old, fresh):
        names = [getattr(key, "key", "") for key in path]
        if names[-1] == "row_start":
            return old.at[slots].set(step, mode="drop")
        if any("cross_attention" in name for name in names):
            padding = [(0, 0)] * old.ndim
            padding[2] = (0, old.shape[2] - fresh.shape[2])  # [rows, heads, source, d_k]
            return old.at[slots].set(jnp.pad(fresh, padding), mode="drop")
        return old
    return jax.tree_util.tree_map_with_path(merge, running, new)


@dataclasses.dataclass
class _Slot:
    sentence: Sentence
    done: Done
    arrived: float


class ContinuousGreedy:
    """Greedy decoding over `slots` rows of a restored encoder-decoder `decode.Decoder`,
    sources up to `source_length` tokens, outputs up to a source's length bucket +
    `extra_length` (as `decode` limits them)."""

    def __init__(self, decoder: decode.Decoder, slots: int, source_length: int,
                 extra_length: int):
        if decoder.model_type.name != "encoder_decoder":
            raise ValueError(f"continuous batching decodes encoder-decoder models, not "
                             f"{decoder.model_type.name}; serve it with --batching static")
        self.decoder = decoder
        self.slots = slots
        self.source_length = source_length
        self.options = decode.DecodeOptions(decode.Search(1, 0.0), extra_length=extra_length)
        self.length = decode.batch_lengths(decoder, self.options, source_length)[1]
        self.admit_buckets = powers_of_two_up_to(slots)
        self._admit = jax.jit(self._admit_program, donate_argnums=0)
        self._advance = jax.jit(self._advance_program, donate_argnums=0)
        self._empty_caches = jax.jit(self._caches, static_argnums=1)
        self._state: dict[str, Any] | None = None

    # --- the device side ----------------------------------------------------------------

    def _caches(self, inputs: Array, length: int) -> tuple[Any, ...]:
        """Each model's cache of `inputs`, with self-attention rings of `length` positions."""
        caches = []
        for module, params in zip(self.decoder.models, self.decoder.params, strict=True):
            encoded = module.apply({"params": params}, inputs, method=module.encode)
            caches.append(init_cache(module, params, encoded, inputs, length))
        return tuple(caches)

    def empty_state(self) -> dict[str, Any]:
        """Every slot free: a cache for `slots` rows, and each row's output so far."""
        rows, length = self.slots, self.length
        inputs = jnp.zeros((rows, self.source_length), jnp.int32).at[:, 0].set(EOS_ID)
        return {
            "caches": self._empty_caches(inputs, length),
            "inputs": inputs,
            "step": jnp.zeros((), jnp.int32),
            "start": jnp.zeros((rows,), jnp.int32),
            "tokens": jnp.zeros((rows, length), jnp.int32),
            "prefix": jnp.zeros((rows, length), jnp.int32),
            "prefix_length": jnp.zeros((rows,), jnp.int32),
            "limit": jnp.zeros((rows,), jnp.int32),
            "log_prob": jnp.zeros((rows,), jnp.float32),
            "done": jnp.ones((rows,), bool),
        }

    def _admit_program(self, state, slots, inputs, prefix, limit):
        """New sentences into `slots` [n] (== self.slots: padding): their sources [n, a source
        length bucket], prefixes [n, length] and output limits [n]."""
        # Rings of one position: "init" runs the decoder over the whole ring's length.
        caches = tuple(_admitted(old, new, slots, state["step"])
                       for old, new in zip(state["caches"], self._caches(inputs, 1),
                                           strict=True))
        rows = lambda key, value: state[key].at[slots].set(value, mode="drop")  # noqa: E731
        count, source = inputs.shape
        padded = jnp.pad(inputs, ((0, 0), (0, self.source_length - source)))
        return {
            **state,
            "caches": caches,
            "inputs": rows("inputs", padded),
            "start": rows("start", jnp.full((count,), state["step"])),
            "tokens": rows("tokens", jnp.zeros_like(prefix)),
            "prefix": rows("prefix", prefix),
            "prefix_length": rows("prefix_length", jnp.sum(prefix > 0, axis=1)),
            "limit": rows("limit", limit),
            "log_prob": rows("log_prob", jnp.zeros((count,), jnp.float32)),
            "done": rows("done", jnp.zeros((count,), bool)),
        }

    def _step(self, state):
        rows = jnp.arange(self.slots)
        own = state["step"] - state["start"]  # each row's position in its output
        place = jnp.minimum(own, self.length - 1)
        last = jnp.where(own == 0, 0, state["tokens"][rows, jnp.maximum(place - 1, 0)])
        outs = [decode_step(module, params, cache, None, state["inputs"], last)
                for module, params, cache in zip(self.decoder.models, self.decoder.params,
                                                 state["caches"], strict=True)]
        log_probs = search.no_padding(sum(jax.nn.log_softmax(logits) for logits, _ in outs)
                                      / len(outs))
        choice = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        forced = own < state["prefix_length"]
        generating = ~forced & ~state["done"]
        token = jnp.where(forced, state["prefix"][rows, place],
                          jnp.where(generating, choice, PAD_ID))
        picked = jnp.take_along_axis(log_probs, choice[:, None], axis=-1)[:, 0]
        writing = ~state["done"]
        ended = writing & ((generating & (choice == EOS_ID)) | (own + 1 >= state["limit"]))
        return {
            **state,
            "caches": tuple(cache for _, cache in outs),
            "step": state["step"] + 1,
            "tokens": state["tokens"].at[rows, place].set(
                jnp.where(writing, token, state["tokens"][rows, place])),
            "log_prob": state["log_prob"] + jnp.where(generating, picked, 0.0),
            "done": state["done"] | ended,
        }, ended.any()

    def _advance_program(self, state, max_steps):
        """Steps every slot until a row finishes, every row is done, or `max_steps`."""
        def going(carry):
            state, count, ended = carry
            return (count < max_steps) & ~ended & ~state["done"].all()

        def body(carry):
            state, count, _ = carry
            state, ended = self._step(state)
            return state, count + 1, ended

        state, count, _ = jax.lax.while_loop(
            going, body, (state, jnp.zeros((), jnp.int32), jnp.zeros((), bool)))
        return state, count

    # --- the host side --------------------------------------------------------------------

    def limit(self, sentence: Sentence) -> int:
        """The most output tokens `decode` gives this sentence alone."""
        return decode.batch_lengths(self.decoder, self.options, len(sentence.ids))[1]

    def admit(self, free: Sequence[int], sentences: Sequence[Sentence]) -> None:
        """Starts `sentences` in the free slots `free` (as many of them)."""
        count = next(size for size in self.admit_buckets if size >= len(sentences))
        slots = np.full((count,), self.slots, np.int32)
        # The encoder is a sizeable part of a short sentence's cost: sources padded to their
        # length bucket, not to the longest source served.
        source = bucket_length(max(len(s.ids) for s in sentences), self.source_length)
        inputs = np.zeros((count, source), np.int32)
        inputs[:, 0] = EOS_ID
        prefix = np.zeros((count, self.length), np.int32)
        limit = np.ones((count,), np.int32)
        for row, (slot, sentence) in enumerate(zip(free, sentences, strict=False)):
            slots[row] = slot
            inputs[row, : len(sentence.ids)] = sentence.ids
            prefix[row, : len(sentence.prefix)] = sentence.prefix
            limit[row] = self.limit(sentence)
        if self._state is None:
            self._state = self.empty_state()
        self._state = self._admit(self._state, slots, inputs, prefix, limit)

    def advance(self, max_steps: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(steps run, done [slots], tokens [slots, length], log-probs [slots]) after
        stepping until a row finishes or `max_steps`."""
        self._state, steps = self._advance(self._state, np.int32(max_steps))
        done, tokens, log_prob = jax.device_get(
            (self._state["done"], self._state["tokens"], self._state["log_prob"]))
        return int(steps), done, tokens, log_prob

    def warm_up(self) -> int:
        """Compiles `admit` for each bucket of new sentences and of their source length, and
        `advance`; returns how many programs."""
        sources = sorted({bucket_length(n, self.source_length)
                          for n in range(1, self.source_length + 1)})
        for count in self.admit_buckets:
            for source in sources:
                warm = Sentence((WARM_UP_TOKEN,) * (source - 1) + (EOS_ID,))
                self.admit(range(count), [warm] * count)
        self.advance(1)
        self._state = self.empty_state()
        return len(self.admit_buckets) * len(sources) + 1


class SlotScheduler:
    """Runs a `ContinuousGreedy` on its own thread: sentences queue with a callback, take free
    slots as they free, and each callback gets its sentence's hypothesis (or the error)."""

    def __init__(self, decoder: ContinuousGreedy, idle_steps: int = 8,
                 on_admit: Callable[[int, float, float], None] = lambda count, s, wait: None):
        self.decoder = decoder
        # While a slot is free, the loop comes back at least this often to take newcomers.
        self.idle_steps = idle_steps
        # (sentences admitted together, seconds of their admission and first advance, seconds
        # the first of them waited): the server's batch metrics.
        self.on_admit = on_admit
        self._waiting: collections.deque[_Slot] = collections.deque()
        self._busy: dict[int, _Slot] = {}
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Sentences waiting for a slot or being decoded."""
        with self._lock:
            return len(self._waiting) + len(self._busy)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def submit(self, sentence: Sentence, done: Done) -> None:
        """Queues `sentence`; `done` gets its hypotheses (with their texts) or the error, on
        this scheduler's thread (an empty line without a prefix: at once, as `decode`)."""
        if not decode.needs_search(sentence.ids, sentence.prefix):
            done(list(decode.EMPTY))
            return
        with self._lock:
            self._waiting.append(_Slot(sentence, done, time.perf_counter()))
            self._lock.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="continuous", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the loop once nothing waits or decodes."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        slots = self.decoder.slots
        while True:
            with self._lock:
                while not self._waiting and not self._busy and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._waiting and not self._busy:
                    return
                free = [s for s in range(slots) if s not in self._busy]
                newcomers = [self._waiting.popleft()
                             for _ in range(min(len(free), len(self._waiting)))]
                for slot, waiting in zip(free, newcomers, strict=False):
                    self._busy[slot] = waiting
            try:
                self._admit_and_advance(free, newcomers, slots)
            except Exception as error:  # a bug must fail its sentences, not end the server
                logging.exception("continuous decoding failed")
                with self._lock:
                    failed, self._busy = list(self._busy.values()), {}
                    self.decoder._state = None
                for waiting in failed:
                    waiting.done(error)

    def _admit_and_advance(self, free: list[int], newcomers: list[_Slot], slots: int) -> None:
        start = time.perf_counter()
        if newcomers:
            self.decoder.admit(free, [w.sentence for w in newcomers])
        with self._lock:
            idle = len(self._busy) < slots
        _, done, tokens, log_prob = self.decoder.advance(
            self.idle_steps if idle else self.decoder.length)
        if newcomers:
            self.on_admit(len(newcomers), time.perf_counter() - start,
                          start - newcomers[0].arrived)
        with self._lock:
            finished = [(slot, self._busy.pop(slot)) for slot in list(self._busy)
                        if done[slot]]
        for slot, waiting in finished:
            ids = decode.strip_eos(tokens[slot, : self.decoder.limit(waiting.sentence)])
            value = float(log_prob[slot])  # greedy: the score is the log-prob
            waiting.done(decode.with_texts(self.decoder.decoder,
                                           [decode.Hypothesis(ids, value, value)]))
