"""The built-in sort task (`3 1 4` -> `1 3 4`) with the small model of configs/reverse.py."""

from t2t_jax.config import small_task_config


def get_config():
    return small_task_config("sort")
