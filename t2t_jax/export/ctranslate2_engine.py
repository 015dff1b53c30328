"""Decoding an export with CTranslate2: the engine behind `decode --engine ctranslate2` and
`serve --engine ctranslate2`.

Text is tokenized by our own tokenizer (shipped in the export) and handed to CTranslate2 as
pieces, so both engines see the same ids. CTranslate2's beam search divides by length^alpha
where ours divides by GNMT's ((5 + L) / 6)^alpha, and it stops by its own rule; so it searches
with no length penalty and `patience` 2, returns twice the beam size of finished hypotheses,
and these are re-ranked by our penalty. Every hypothesis's log-prob is its teacher-forced score
(`score_batch`, which matches ours to about 1e-6), with a target prefix's tokens left out as
`decode` leaves them out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from t2t_jax.data.batching import bucket_length
from t2t_jax.data.tokenizer import EOS_ID, UnknownSymbol, tokenizer_from_json
from t2t_jax.decode import Hypothesis
from t2t_jax.export.ctranslate2_spec import SETTINGS_FILE
from t2t_jax.serving.engine import Sentence

MISSING_EXTRA = "the CTranslate2 engine needs its extra: pip install -e '.[ctranslate2]'"


def gnmt_penalty(length: int, alpha: float) -> float:
    """((5 + length) / 6) ^ alpha, as `search.length_penalty`."""
    return ((5.0 + length) / 6.0) ** alpha


class CTranslate2Engine:
    """A CTranslate2 Translator over an export directory (`t2t-jax export`)."""

    name = "ctranslate2"

    def __init__(self, export_dir: str, beam_sizes: Sequence[int] = (1, 4), max_batch: int = 32,
                 extra_length: int = 50, compute_type: str = "default", threads: int = 0,
                 max_source_length: int | None = None):
        try:
            import ctranslate2
        except ImportError as error:
            raise ImportError(f"{MISSING_EXTRA} ({error})") from None
        settings_path = os.path.join(export_dir, SETTINGS_FILE)
        if not os.path.exists(settings_path):
            raise FileNotFoundError(f"{export_dir} is not an export of t2t-jax (no "
                                    f"{SETTINGS_FILE}); make one with t2t-jax export")
        with open(settings_path) as f:
            self.settings = json.load(f)
        self.tokenizer = tokenizer_from_json(self.settings["tokenizer"])
        with open(os.path.join(export_dir, "shared_vocabulary.json")) as f:
            self.pieces = json.load(f)
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}
        self.translator = ctranslate2.Translator(export_dir, device="cpu",
                                                 compute_type=compute_type,
                                                 intra_threads=threads)
        self.beam_sizes = tuple(sorted(set(beam_sizes)))
        self.max_batch = max_batch
        self.extra_length = extra_length
        self.max_source_length = min(int(self.settings["max_source_length"]),
                                     max_source_length or 1 << 30)
        self.step = int(self.settings.get("step", 0))

    def encode(self, texts, prefixes):
        sentences = []
        for number, text in enumerate(texts, 1):
            try:
                ids = self.tokenizer.encode(text)
                prefix = self.tokenizer.encode(prefixes[number - 1]) if prefixes else []
            except UnknownSymbol as error:
                raise UnknownSymbol(f"text line {number}: {error}") from None
            cut = len(ids) + 1 > self.max_source_length
            ids = ids[: self.max_source_length - 1] + [EOS_ID]
            room = self._max_output(len(ids)) - 1
            if len(prefix) > room:
                raise ValueError(f"target prefix {number} has {len(prefix)} tokens, over the "
                                 f"{room} its output may hold; shorten it or raise "
                                 f"--extra_length")
            sentences.append(Sentence(tuple(ids), tuple(prefix), cut))
        return sentences

    def _max_output(self, source_tokens: int) -> int:
        """decode's output buffer: the source's length bucket + extra_length."""
        return bucket_length(source_tokens, self.max_source_length) + self.extra_length

    def _pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.pieces[i] for i in ids]

    def translate(self, sentences, beam_size, alpha):
        """As JaxEngine.translate: an empty source without a prefix gives one empty
        hypothesis, undecoded."""
        wanted = [n for n, s in enumerate(sentences) if len(s.ids) > 1 or s.prefix]
        results = [[Hypothesis([], 0.0, 0.0, "")] for _ in sentences]
        if wanted:
            found = self._search([sentences[n] for n in wanted], beam_size, alpha)
            for n, hypotheses in zip(wanted, found, strict=True):
                results[n] = hypotheses
        return results

    def _search(self, sentences, beam_size, alpha):
        sources = [self._pieces(s.ids[:-1]) for s in sentences]  # CTranslate2 adds the EOS
        prefixes = [self._pieces(s.prefix) or None for s in sentences]
        longest = max(self._max_output(len(s.ids)) for s in sentences)
        found = self.translator.translate_batch(
            sources, target_prefix=prefixes if any(prefixes) else None,
            max_batch_size=self.max_batch, beam_size=beam_size,
            num_hypotheses=2 * beam_size if beam_size > 1 else 1,
            patience=2 if beam_size > 1 else 1, length_penalty=0.0,
            max_decoding_length=longest)
        flat = [(n, [self.ids[p] for p in hypothesis])
                for n, result in enumerate(found) for hypothesis in result.hypotheses]
        scored = self.translator.score_batch(
            [sources[n] for n, _ in flat], [self._pieces(ids) for _, ids in flat],
            max_batch_size=self.max_batch * 2 * beam_size)
        results: list[list[Hypothesis]] = [[] for _ in sentences]
        for (n, ids), score in zip(flat, scored, strict=True):
            # EOS's log-prob is counted, unless the output ran to the length limit without it.
            ended = len(ids) < longest
            chosen = score.log_probs[len(sentences[n].prefix): None if ended else -1]
            log_prob = float(sum(chosen))
            score = log_prob / gnmt_penalty(len(chosen), alpha) if beam_size > 1 else log_prob
            results[n].append(Hypothesis(ids, log_prob, score, self.tokenizer.decode(ids)))
        return [sorted(r, key=lambda h: -h.score)[: beam_size] for r in results]

    def warm_up(self):
        return f"CTranslate2 needs no compiling ({self.translator.compute_type} weights)"
