"""A Transformer on your own parallel text, sized by a preset for the corpus you have.

  t2t-jax train --config configs/parallel_text.py:small --workdir runs/mine \
    --config.data.train_source=train.en --config.data.train_target=train.de \
    --config.data.eval_source=dev.en --config.data.eval_target=dev.de \
    --config.data.test_source=test.en --config.data.test_target=test.de

Which preset (`:small`, `:base`, `:big`; none is `:base`):

- `small`, for 10k-200k sentence pairs: 3+3 layers, d_model 256, d_ff 1024, 4 heads (7.6M
  parameters with 8k pieces), dropout 0.2, 8k SentencePiece pieces, 32 packed rows of 128
  tokens a step, warmup 800, 17 epochs with the learning rate falling linearly to 0 over the
  last 30% of them; dev BLEU and a checkpoint every 500 steps; at the end, the test set by beam
  search with the average of 5 checkpoints (params) from the last 10% of the run. Sized to
  train a corpus of 30k short pairs on CPUs alone.
- `base`, for 200k-2M pairs: the paper's base model (6+6, 512, 2048, 8 heads, dropout 0.1),
  8k pieces, 64 packed rows of 128 tokens, 100k steps.
- `big`, for more than 2M pairs, on GPUs or TPUs: the paper's big model (6+6, 1024, 4096, 16
  heads, dropout 0.3), 32k pieces, 96 packed rows of 256 tokens (the paper's ~25k tokens a
  side), 300k steps.

Small corpora overfit a big model long before they train it: the small preset trades width and
depth for dropout, and counts its length in epochs (`train.num_epochs`), so that it scales with
the corpus. What each preset costs, per epoch and per run, on CPUs (and the paper's models on a
GPU, for scale) is measured in docs/benchmarks.md ("What the parallel_text presets cost"); on a
GPU, pass `--config.model.dtype=bfloat16`.

Files may be gzipped; `--config.data.train_tsv=train.tsv` (source<TAB>target) replaces a pair.
A SentencePiece model of `data.spm_vocab_size` pieces is trained on the training files and kept
in the workdir and in every checkpoint. Greedy BLEU on the test files, and on the eval files
(`dev_bleu`, which keeps the best checkpoint in WORKDIR/best; `train.select_by=eval_loss` picks
it by validation loss instead), is logged every `train.bleu_every` steps;
`--config.train.early_stop_evals=K` stops after K evaluations without a better dev score. At
the end, `metrics.jsonl` gets `test_bleu` and `test_chrf` (beam 4, alpha 0.6, with their
sacreBLEU signatures), `best_test_bleu` (the best checkpoint, greedy), and
WORKDIR/hypotheses_test_final.txt the hypotheses in the test file's line order.
"""

from t2t_jax.config import default_config, make_big

PRESETS = ("small", "base", "big")


def get_config(preset: str | None = None):
    """The config of `preset` (see the module docstring); None is "base"."""
    preset = preset or "base"
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r} for configs/parallel_text.py; use one of "
            f"{', '.join(f'configs/parallel_text.py:{p}' for p in PRESETS)}"
        )
    config = default_config()
    config.data.task = "parallel_text"
    config.data.spm_vocab_size = 8000  # own corpora are usually far smaller than WMT
    config.data.max_source_length = 128
    config.data.max_target_length = 128
    config.data.test_max_source_length = 256  # longer test sentences are cut, not dropped
    config.data.test_max_target_length = 256
    config.data.packing = True
    config.data.batch_size = 64  # rows of 128 packed tokens
    config.data.eval_batch_size = 64
    config.train.bleu_every = 5000
    config.train.bleu_examples = -1
    if preset == "small":
        config.model.update(num_encoder_layers=3, num_decoder_layers=3, d_model=256, d_ff=1024,
                            num_heads=4, dropout_rate=0.2)
        config.data.batch_size = 32
        config.train.update(num_epochs=17.0, warmup_steps=800, cooldown_fraction=0.3,
                            eval_every=500, checkpoint_every=500, bleu_every=500,
                            keep_checkpoints=5, average_last=5, average_span=0.1)
    elif preset == "big":
        config = make_big(config)
        config.data.spm_vocab_size = 32_000
        config.data.max_source_length = config.data.max_target_length = 256
        config.data.batch_size = 96  # x 256 tokens: the paper's ~25,000 tokens a side
    return config
