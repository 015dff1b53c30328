"""Evaluation during and after training: loss and accuracy over the eval splits, decoded samples,
greedy BLEU that selects checkpoints, and the final report (beam search on the averaged or last
checkpoint, the best dev checkpoint's BLEU). Every host decodes alone, on its own devices."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from t2t_jax import bleu, checkpoint, decode, files, metrics, selection
from t2t_jax.data import loader
from t2t_jax.train_step import TrainState, accumulate

if TYPE_CHECKING:  # the type only: train imports this module
    from t2t_jax.train import Experiment


def split_metrics(exp: Experiment, state: TrainState, split: str, prefix: str
                  ) -> dict[str, float]:
    """Loss and token accuracy over a split (or its first data.eval_steps batches)."""
    totals = None
    for local in loader.eval_batches(
        exp.dataset.split(split), loader.eval_layout(exp.config, split),
        exp.config.data.eval_batch_size, exp.stepper.batch_shard, exp.config.data.eval_steps,
    ):
        sums = exp.stepper.evaluate(state, exp.stepper.put_batch(local))
        totals = accumulate(totals, sums)
    if totals is None:
        raise ValueError(f"the {split} split has no example within the configured max lengths")
    return metrics.summarize_eval(exp.stepper.fetch_metrics(totals), prefix)


def _decode(
    exp: Experiment, params: Any, sources: list[str], split: str, beam_size: int = 1,
    alpha: float = 0.6,
) -> list[str]:
    """Outputs for `sources` of `split` from host `params` (`Stepper.host_params`, or restored),
    through the one decoding path; every host decodes alone, on its own devices."""
    data = exp.config.data
    prefix = "test_" if split == "test" else ""
    decoder = decode.decoder_for_params(
        exp.model_config, params, exp.tokenizer, exp.config, data[f"{prefix}max_source_length"]
    )
    options = decode.DecodeOptions(
        decode.Search(beam_size, alpha), batch_size=data.eval_batch_size,
        max_output_length=data[f"{prefix}max_target_length"],
    )
    return decode.best_texts(decode.translate(decoder, sources, options)[0])


def _text_examples(exp: Experiment, split: str, count: int) -> tuple[list[str], list[str]]:
    """(sources, targets) of the first `count` (-1: all) examples of a split, in its files'
    line order."""
    data = exp.dataset.split(split)
    indices = range(data.num_examples if count < 0 else min(count, data.num_examples))
    return data.texts("inputs", indices), data.texts("targets", indices)


def decode_samples(exp: Experiment, state: TrainState) -> list[tuple[str, str, str]]:
    """(source, target, greedy output) for the first `train.num_decode_examples` of validation."""
    count = exp.config.train.num_decode_examples
    if count <= 0:
        return []
    sources, targets = _text_examples(exp, "validation", count)
    outputs = _decode(exp, exp.stepper.host_params(state), sources, "validation")
    return list(zip(sources, targets, outputs, strict=True))


def bleu_scores(exp: Experiment, state: TrainState) -> tuple[dict[str, float], dict[str, str]]:
    """Greedy BLEU (sacrebleu, 13a) on the first `train.bleu_examples` of the test split
    (`bleu`) and, where the data has one, of the validation split (`dev_bleu`, which selects
    checkpoints); and sacrebleu's signatures of how they were computed."""
    params = exp.stepper.host_params(state)
    scores, signatures = {}, {}
    for split, name in (("test", "bleu"), ("validation", "dev_bleu")):
        if split == "validation" and "validation" not in exp.dataset.splits:
            continue
        sources, references = _text_examples(exp, split, exp.config.train.bleu_examples)
        score, signature = bleu.corpus_bleu(_decode(exp, params, sources, split), references)
        logging.info("%s %.2f on %d %s sentences (%s)", name, score, len(sources), split,
                     signature)
        scores[name], signatures[f"{name}_signature"] = score, signature
    return scores, signatures


def final_report(exp: Experiment, workdir: str) -> tuple[dict[str, float], dict[str, str]]:
    """The numbers papers report, from checkpoints on disk: the test split by beam search
    (`train.final_beam_size`, `final_alpha`) with the average of the pool's checkpoints
    (`train.average_last`; else the last checkpoint): `test_bleu`, `test_chrf`; and the best
    dev checkpoint's greedy `best_test_bleu`. Writes WORKDIR/hypotheses_test_final.txt in the
    test file's order. ({scores}, {signatures and what was decoded})."""
    train = exp.config.train
    sources, references = _text_examples(exp, "test", train.bleu_examples)
    averaged = selection.average_pool(workdir, train.average_last) if train.average_last else None
    source = averaged[0] if averaged else workdir
    params = checkpoint.restore_host_state(source)[0]["params"]
    outputs = _decode(exp, params, sources, "test", train.final_beam_size, train.final_alpha)
    with files.open_file(os.path.join(workdir, "hypotheses_test_final.txt"), "w") as f:
        f.write("".join(line + "\n" for line in outputs))
    scores, texts = {}, {}
    scores["test_bleu"], texts["test_bleu_signature"] = bleu.corpus_bleu(outputs, references)
    scores["test_chrf"], texts["test_chrf_signature"] = bleu.corpus_chrf(outputs, references)
    texts["test_params"] = (
        f"average of steps {averaged[1]}" if averaged else "the last checkpoint"
    ) + f", beam {train.final_beam_size}, alpha {train.final_alpha}"
    best = os.path.join(workdir, selection.BEST)
    if checkpoint.checkpoint_steps(best):
        best_params = checkpoint.restore_host_state(best)[0]["params"]
        scores["best_test_bleu"] = bleu.corpus_bleu(
            _decode(exp, best_params, sources, "test"), references
        )[0]
    logging.info("final test BLEU %.2f, chrF %.2f (%s)", scores["test_bleu"], scores["test_chrf"],
                 texts["test_params"])
    return scores, texts


def eval_metrics(exp: Experiment, state: TrainState) -> dict[str, float]:
    """`eval_*` of the validation split and `test_*` of the test split."""
    return split_metrics(exp, state, "validation", "eval") | split_metrics(exp, state, "test",
                                                                             "test")
