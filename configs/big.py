"""The paper's big model (Table 3): N=6, d_model=1024, d_ff=4096, h=16, P_drop=0.3.

About 214.2M parameters; the paper trains it for 300k steps and averages the last 20 checkpoints.
"""

from t2t_jax.config import default_config, make_big


def get_config():
    config = default_config()
    config.model.vocab_size = 37_000
    return make_big(config)
