"""BLEU as the WMT papers report it: sacrebleu on detokenized, cased text, `13a` tokenization;
and chrF, sacrebleu's character n-gram F-score (chrF2), which WMT reports beside it."""

from __future__ import annotations

from collections.abc import Sequence


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """(BLEU score in 0..100, sacrebleu's signature string naming exactly how it was computed)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    import sacrebleu  # on first use: training without BLEU needs none

    metric = sacrebleu.metrics.BLEU(tokenize="13a")
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return score.score, str(metric.get_signature())


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """(chrF score in 0..100, sacrebleu's signature string)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    import sacrebleu

    metric = sacrebleu.metrics.CHRF()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return score.score, str(metric.get_signature())
