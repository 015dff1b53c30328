"""The embedded default: reverse a sequence of 1-20 symbols (`3 1 4` -> `4 1 3`).

A small post-LN Transformer (2+2 layers, d_model 128) that decodes every one of the 1,000
validation sequences exactly (greedy and beam 4) in minutes on CPUs (docs/benchmarks.md has the
times). The recipe, tuned for that on the same budget of steps:
- packed rows of 64 tokens, 32 a step (about 5 examples a row): no step is spent on padding,
  where padded rows of 21 tokens were about half padding;
- learning rate 2x the paper's formula, 300 warmup steps, 1,500 steps;
- the rate falls linearly to zero over the last third of the steps (`train.cooldown_fraction`):
  without it the last symbol-level slips (a dropped or repeated symbol) remain.
The test split (21-40 symbols) shows how far it generalises in length (not far: sinusoidal
positions alone do not extrapolate well).
"""

from t2t_jax.config import small_task_config


def get_config():
    config = small_task_config("reverse")
    config.data.packing = True
    config.data.max_source_length = config.data.max_target_length = 64  # the packed row
    config.data.batch_size = 32
    config.train.num_steps = 1500
    config.train.learning_rate = 2.0
    config.train.warmup_steps = 300
    config.train.cooldown_fraction = 1 / 3  # the last 500 steps
    return config
