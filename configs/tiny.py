"""A smoke test: a 1+1-layer, d_model 32 Transformer on reversing 1-6 symbols, 4 steps.

Each step compiles and runs in well under a second on a CPU: for checking a setup (a launch
script, many processes, a new machine) before a real run. Lengthen with
`--config.train.num_steps=500`.
"""

from t2t_jax.config import tiny_config


def get_config():
    return tiny_config()
