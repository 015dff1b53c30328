"""The paper's base model on your own parallel text.

  t2t-jax train --config configs/parallel_text.py --workdir runs/mine \
    --config.data.train_source=train.en --config.data.train_target=train.de \
    --config.data.eval_source=dev.en --config.data.eval_target=dev.de \
    --config.data.test_source=test.en --config.data.test_target=test.de

Files may be gzipped; `--config.data.train_tsv=train.tsv` (source<TAB>target) replaces a pair.
A SentencePiece model of `data.spm_vocab_size` pieces is trained on the training files and kept
in the workdir and in every checkpoint. BLEU on the test files is logged every
`train.bleu_every` steps.
"""

from t2t_jax.config import default_config


def get_config():
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
    return config
