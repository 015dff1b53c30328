"""`python -m t2t_jax.cli`: the `t2t-jax` command."""

from t2t_jax.cli import run

run()
