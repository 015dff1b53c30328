"""The paper's base model (Table 3): N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1, 37000 vocab.

About 63.0M parameters. Trains on the built-in reverse task unless `data` is changed.
"""

from t2t_jax.config import default_config


def get_config():
    config = default_config()
    config.model.vocab_size = 37_000
    return config
