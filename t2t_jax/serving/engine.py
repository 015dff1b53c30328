"""What a server translates with: an engine encodes request text, translates batches of encoded
sentences that share one search setting, and compiles every shape it will see before serving.

`JaxEngine` is the decoding path of `decode.py` itself (checkpoints, averaging, ensembles,
greedy, beam and n-best), so a served translation is `t2t-jax decode`'s. It compiles one program
per beam size, rows bucket (powers of two up to `max_batch`) and source length bucket; the
length penalty alpha is an input of that program, and each program searches `beam_size`
hypotheses, of which a request takes its `nbest`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from t2t_jax import decode
from t2t_jax.data.batching import bucket_length
from t2t_jax.data.tokenizer import EOS_ID

WARM_UP_TOKEN = 3  # the first id after padding, EOS and unknown: a real token of any vocabulary


@dataclasses.dataclass(frozen=True)
class Sentence:
    """One sentence to translate: its source ids (EOS last), its target prefix's ids, and
    whether its source was cut to the model's length."""

    ids: tuple[int, ...]
    prefix: tuple[int, ...] = ()
    cut: bool = False


class Engine(Protocol):
    """What the server asks of a translation engine."""

    name: str
    beam_sizes: tuple[int, ...]
    max_batch: int
    max_source_length: int

    def encode(self, texts: Sequence[str], prefixes: Sequence[str] | None) -> list[Sentence]:
        """The sentences of a request; a mistake in it (an unknown symbol, a prefix with no
        room) is a ValueError of one line."""

    def translate(self, sentences: Sequence[Sentence], beam_size: int, alpha: float
                  ) -> list[list[decode.Hypothesis]]:
        """`beam_size` hypotheses (greedy: one) of each sentence, best first, in order."""

    def warm_up(self) -> str:
        """Compiles every program a request may need; returns what it compiled, as text."""


def powers_of_two_up_to(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, and `limit`: the rows buckets of a batch."""
    sizes = [1 << k for k in range(limit.bit_length()) if 1 << k < limit]
    return sizes + [limit]


class JaxEngine:
    """The project's own decoding path on a restored `decode.Decoder`."""

    name = "jax"

    def __init__(self, decoder: decode.Decoder, beam_sizes: Sequence[int], max_batch: int,
                 extra_length: int = 50, continuous: bool = False):
        if max_batch < 1:
            raise ValueError(f"--max_batch must be at least 1, got {max_batch}")
        self.decoder = decoder
        self.beam_sizes = tuple(sorted(set(beam_sizes)))
        self.max_batch = max_batch
        self.extra_length = extra_length
        self.max_source_length = decoder.max_source_length
        self.rows_buckets = powers_of_two_up_to(max_batch)
        self.source_buckets = sorted({bucket_length(n, self.max_source_length)
                                      for n in range(1, self.max_source_length + 1)})
        # Greedy requests decode in `max_batch` slots that refill as sentences finish (an
        # encoder-decoder only); other beam sizes batch as below.
        self.continuous = None
        if continuous and 1 in self.beam_sizes and decoder.model_type.name == "encoder_decoder":
            from t2t_jax.serving.continuous import ContinuousGreedy

            self.continuous = ContinuousGreedy(decoder, max_batch, self.max_source_length,
                                               extra_length)

    def options(self, beam_size: int, alpha: float, rows: int) -> decode.DecodeOptions:
        """The decode options of a batch of `rows` sentences: its rows bucket, and all
        `beam_size` hypotheses."""
        padded = next(size for size in self.rows_buckets if size >= rows)
        search = decode.Search(beam_size, alpha, nbest=beam_size)
        return decode.DecodeOptions(search, batch_size=padded, extra_length=self.extra_length,
                                    always_prefix_program=True)

    def encode(self, texts, prefixes):
        encoded, cut = decode.encode_lines(self.decoder, texts, what="text")
        prefix_ids = decode.encode_prefixes(self.decoder, prefixes, len(texts))
        prefix_ids = prefix_ids or [[] for _ in texts]
        decode.check_prefixes(self.decoder, self.options(1, 0.0, 1), encoded, prefix_ids)
        cut_lines = set(cut)
        return [Sentence(tuple(ids), tuple(prefix), n + 1 in cut_lines)
                for n, (ids, prefix) in enumerate(zip(encoded, prefix_ids, strict=True))]

    def translate(self, sentences, beam_size, alpha):
        options = self.options(beam_size, alpha, len(sentences))
        results, _ = decode.translate_encoded(
            self.decoder, [list(s.ids) for s in sentences], options,
            prefixes=[list(s.prefix) for s in sentences])
        return results

    def warm_up(self):
        start = time.perf_counter()
        count = self.continuous.warm_up() if self.continuous else 0
        for beam_size in self.beam_sizes:  # greedy too: under a light load it batches
            for rows in self.rows_buckets:
                for length in self.source_buckets:
                    source = (WARM_UP_TOKEN,) * (length - 1) + (EOS_ID,)
                    self.translate([Sentence(source)] * rows, beam_size, 0.6)
                    count += 1
        seconds = time.perf_counter() - start
        summary = (f"compiled {count} programs (beam sizes {list(self.beam_sizes)} x rows "
                   f"{self.rows_buckets} x source lengths {self.source_buckets}"
                   f"{'; greedy in continuous batches' if self.continuous else ''}) in "
                   f"{seconds:.1f} s")
        logging.info(summary)
        return summary
