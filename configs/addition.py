"""Multi-digit addition in base 10 (`4 7 + 5` -> `5 2`), numbers of 1-10 digits; test: 11-15.

Harder than reverse: carries need the whole of both numbers, so it trains longer.
"""

from t2t_jax.config import small_task_config


def get_config():
    config = small_task_config("addition")
    config.data.algorithmic.max_length = 10
    config.data.algorithmic.test_max_length = 15
    config.data.max_source_length = 22  # 10 digits + '+' + 10 digits + EOS
    config.data.max_target_length = 12
    config.data.test_max_source_length = 32
    config.data.test_max_target_length = 17
    config.train.num_steps = 10_000
    return config
