"""The paper's optimizer (section 5.3): Adam(0.9, 0.98, 1e-9), warmup then 1/sqrt(step) decay,
with an optional linear cooldown to zero over the last steps (not in the paper)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax


def paper_schedule(
    d_model: int, warmup_steps: int, scale: float = 1.0, num_steps: int = 0,
    cooldown_fraction: float = 0.0,
) -> optax.Schedule:
    """lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), step counted from 1;
    with `cooldown_fraction` > 0, times a factor falling linearly from 1 to 0 over that fraction
    of `num_steps` at the end (short runs end on settled weights rather than at a high rate)."""
    if warmup_steps < 1:
        raise ValueError(f"train.warmup_steps must be >= 1, got {warmup_steps}")
    if not 0.0 <= cooldown_fraction < 1.0:
        raise ValueError(f"train.cooldown_fraction must be in [0, 1), got {cooldown_fraction}")
    cooldown_steps = round(cooldown_fraction * num_steps)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        rate = scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)
        if cooldown_steps:
            rate = rate * jnp.clip((num_steps - count) / cooldown_steps, 0.0, 1.0)
        return rate

    return schedule


def schedule_from_config(train_config: Any, d_model: int) -> optax.Schedule:
    """`paper_schedule` with the settings of `config.train`."""
    return paper_schedule(d_model, train_config.warmup_steps, train_config.learning_rate,
                          train_config.num_steps, train_config.get("cooldown_fraction", 0.0))


def make_optimizer(train_config: Any, d_model: int) -> optax.GradientTransformation:
    """Adam on the paper's schedule, with optional clipping and gradient accumulation.

    With `grad_accum_steps = k > 1` the returned transformation applies one update every k calls
    (optax.MultiSteps) and the schedule counts updates, not micro-steps.
    """
    schedule = schedule_from_config(train_config, d_model)
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
