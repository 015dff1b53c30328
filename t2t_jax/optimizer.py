"""The paper's optimizer (section 5.3): Adam(0.9, 0.98, 1e-9), warmup then 1/sqrt(step) decay,
with an optional linear cooldown to zero over the last steps (not in the paper)."""

from __future__ import annotations

import functools
from typing import Any

import jax
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


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all the arrays of `tree`, squared and summed in float32 (optax's
    `global_norm` keeps each array's dtype), with one reduction per group of arrays of one shape
    and dtype: their squares are added elementwise first.

    On a GPU each reduction is a kernel launch, and XLA does not merge independent ones: the
    base model's gradient norm was 245 launches (one per array, more for the partial sums of
    large ones), and is 13 this way. Arrays of one shape share their logical axes in these
    models, so their sharding too; where they did not, the sum would still be right, at the
    cost of a resharding."""
    groups: dict[tuple, list[jax.Array]] = {}
    for leaf in jax.tree.leaves(tree):
        groups.setdefault((jnp.shape(leaf), jnp.result_type(leaf)), []).append(leaf)
    total = jnp.zeros((), jnp.float32)
    for leaves in groups.values():
        total += jnp.sum(functools.reduce(jnp.add, (jnp.square(jnp.asarray(x, jnp.float32))
                                                    for x in leaves)))
    return jnp.sqrt(total)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` with `global_norm`'s reductions: the same state, and the same
    result for float32 updates."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        scaled = jax.tree.map(
            lambda t: jnp.where(norm < max_norm, t, (t / norm.astype(t.dtype)) * max_norm),
            updates,
        )
        return scaled, state

    return optax.GradientTransformation(optax.init_empty_state, update)


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
        parts.append(clip_by_global_norm(train_config.grad_clip_norm))
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
