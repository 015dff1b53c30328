"""The paper's optimizer (section 5.3): Adam(0.9, 0.98, 1e-9), warmup then 1/sqrt(step) decay."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax


def paper_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
    """lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), step counted from 1."""
    if warmup_steps < 1:
        raise ValueError(f"train.warmup_steps must be >= 1, got {warmup_steps}")

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule


def make_optimizer(train_config: Any, d_model: int) -> optax.GradientTransformation:
    """Adam on the paper's schedule, with optional clipping and gradient accumulation.

    With `grad_accum_steps = k > 1` the returned transformation applies one update every k calls
    (optax.MultiSteps) and the schedule counts updates, not micro-steps.
    """
    schedule = paper_schedule(d_model, train_config.warmup_steps, train_config.learning_rate)
    parts = []
    if train_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(train_config.grad_clip_norm))
    parts.append(
        optax.adam(
            schedule,
            b1=train_config.adam_b1,
            b2=train_config.adam_b2,
            eps=train_config.adam_eps,
        )
    )
    tx = optax.chain(*parts)
    if train_config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=train_config.grad_accum_steps)
    return tx
