"""The built-in copy task (`3 1 4` -> `3 1 4`) with the small model of configs/reverse.py."""

from t2t_jax.config import small_task_config


def get_config():
    return small_task_config("copy")
