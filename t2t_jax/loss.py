"""The loss: label-smoothed cross-entropy sums over the vocabulary without a one-hot array, with
a custom backward pass that keeps one [tokens, vocab] array instead of several."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Batch = dict[str, Array]


def loss_weights(batch: Batch) -> Array:
    """1.0 on the target tokens that count in the loss: not padding, inside `loss_mask` if any."""
    weights = (batch["targets"] > 0).astype(jnp.float32)
    if "loss_mask" in batch:
        weights = weights * batch["loss_mask"].astype(jnp.float32)
    return weights


def _merge_statistics(a: tuple, b: tuple) -> tuple:
    """Merges two partial `vocab_statistics` (over disjoint parts of the vocabulary): running
    max and sum of exp(logit - max) (the online log-sum-exp), and plain sums of the target's
    logit and of all logits."""
    a_max, a_exp, a_target, a_sum = a
    b_max, b_exp, b_target, b_sum = b
    top = jnp.maximum(a_max, b_max)
    # The larger side's factor is exactly 1 (and -inf - -inf is no NaN).
    exp_sum = (jnp.where(a_max == top, a_exp, a_exp * jnp.exp(a_max - top))
               + jnp.where(b_max == top, b_exp, b_exp * jnp.exp(b_max - top)))
    return top, exp_sum, a_target + b_target, a_sum + b_sum


def _is_target(shape: tuple[int, ...], targets: Array) -> Array:
    index = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
    return index == targets[..., None].astype(jnp.int32)


def _one_pass_statistics(logits: Array, targets: Array) -> tuple[tuple, tuple]:
    """`vocab_statistics` for accelerators, where the loss is bound by memory: one variadic
    reduction reads the logits once. Saves the logits; the backward pass recomputes the
    softmax from them."""
    # A select against the vocabulary index rather than a gather: it fuses into the reduction.
    zero = jnp.zeros((), logits.dtype)
    top, exp_sum, target_logit, total = jax.lax.reduce(
        (logits, jnp.ones_like(logits), jnp.where(_is_target(logits.shape, targets), logits, zero),
         logits),
        (jnp.array(-jnp.inf, logits.dtype), zero, zero, zero),
        _merge_statistics,
        (logits.ndim - 1,),
    )
    log_z = top + jnp.log(exp_sum)
    return (log_z, target_logit, total, top), (logits, log_z)


def _exp_saving_statistics(logits: Array, targets: Array) -> tuple[tuple, tuple]:
    """`vocab_statistics` for the CPU, where the loss is bound by its exponentials: XLA's CPU
    code computes an exp inside a reduction along the last axis about ten times slower than
    elementwise. So the exps are an elementwise pass of their own, summed apart, and saved
    for the backward pass, which then computes none."""
    top = jnp.max(logits, axis=-1)
    unnormalized = jnp.exp(logits - top[..., None])
    exp_sum = jnp.sum(unnormalized, axis=-1)
    # As the one pass's select: a target outside the vocabulary has logit 0 (and gradient 0),
    # where the gather alone would give NaN or wrap around.
    targets = targets.astype(jnp.int32)
    in_vocab = (targets >= 0) & (targets < logits.shape[-1])
    gathered = jnp.take_along_axis(logits, jnp.where(in_vocab, targets, 0)[..., None], -1)
    target_logit = jnp.where(in_vocab, gathered[..., 0], 0.0)
    log_z = top + jnp.log(exp_sum)
    return (log_z, target_logit, jnp.sum(logits, axis=-1), top), (unnormalized, 1.0 / exp_sum)


_STATISTICS_PATHS = {"one_pass": _one_pass_statistics, "exp_saving": _exp_saving_statistics}


def _vocab_statistics(logits, targets, path):
    # The forward and backward passes choose their path apart (what the saved [.., vocab]
    # array means depends on it), which is sound because both resolve in the same lowering.
    if path == "auto":
        outputs, (saved, per_row) = jax.lax.platform_dependent(
            logits, targets, cpu=_exp_saving_statistics, default=_one_pass_statistics)
    else:
        outputs, (saved, per_row) = _STATISTICS_PATHS[path](logits, targets)
    return outputs, (saved, per_row, targets)


def _softmax_from_saved(saved: Array, per_row: Array, path: str) -> Array:
    """The softmax from the forward pass's residuals: exp(logits - log Z) on the one pass,
    the saved exps times 1 / their sum on the exp-saving one."""
    def from_logits(logits, log_z):
        return jnp.exp(logits - log_z)

    def from_exps(unnormalized, inverse_sum):
        return unnormalized * inverse_sum

    per_row = per_row[..., None]
    if path == "auto":
        return jax.lax.platform_dependent(saved, per_row, cpu=from_exps, default=from_logits)
    return (from_exps if path == "exp_saving" else from_logits)(saved, per_row)


def _vocab_statistics_backward(path, residuals, cotangents):
    saved, per_row, targets = residuals
    d_log_z, d_target, d_total, _ = cotangents  # the max has no gradient here
    grad = (d_log_z[..., None] * _softmax_from_saved(saved, per_row, path)
            + jnp.where(_is_target(saved.shape, targets), d_target[..., None], 0.0)
            + d_total[..., None])
    return grad, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def vocab_statistics(
    logits: Array, targets: Array, path: str = "auto"
) -> tuple[Array, Array, Array, Array]:
    """(log Z, the target's logit, the sum of the logits, the largest logit) over the last axis
    of `logits` [.., vocab] float32, for integer `targets` [..]: everything the loss and the
    accuracy need of the vocabulary. Its gradient (d log Z = softmax, d target logit = one-hot
    at the target, d sum = 1) is one elementwise pass. Reverse mode only (a custom VJP).

    `path` "auto" picks by the platform the step is compiled for. On GPUs and TPUs the loss is
    bound by memory (the base model's logits are 2.4 GB a step), and separate reductions
    (logsumexp, a select-sum, a sum) would read them several times (on a GPU twice, five times
    with Triton GEMMs): "one_pass" (`_one_pass_statistics`) reads them once. On the CPU the
    exponentials are the cost: "exp_saving" (`_exp_saving_statistics`) computes them once,
    where the one pass computes them twice forward and again backward.
    """
    return _vocab_statistics(logits, targets, path)[0]


vocab_statistics.defvjp(_vocab_statistics, _vocab_statistics_backward)


def cross_entropy_sums(
    logits: Array, batch: Batch, label_smoothing: float, z_loss: float
) -> dict[str, Array]:
    """Summed label-smoothed cross-entropy and accuracy over the weighted target tokens.

    logits: [batch, length, vocab] float32. The smoothed target puts 1 - eps_ls on the target
    and low = eps_ls / (vocab - 1) on every other token, so its cross-entropy is
    -(1 - eps_ls - low) * log p[target] - low * sum_v log p[v]: reductions over the vocabulary
    (`vocab_statistics`), with no one-hot or soft-target [.., vocab] array (the
    gradient is one fused elementwise pass). The entropy of the smoothed distribution is
    subtracted, so a perfect model scores 0 whatever eps_ls is.
    Returns sums: `loss` (with the z-loss term), `z_loss`, `correct`, `weight`.
    """
    with jax.named_scope("loss"):
        targets = batch["targets"]
        weights = loss_weights(batch)
        vocab = logits.shape[-1]
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (vocab - 1)
        entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
        log_z, target_logit, sum_logits, top = vocab_statistics(logits, targets)
        sum_log_probs = sum_logits - vocab * log_z
        token_loss = (
            -(confidence - low) * (target_logit - log_z) - low * sum_log_probs - entropy
        )
        token_z_loss = z_loss * jnp.square(log_z)
        # The target has the largest logit: the argmax's test without a second reduction over
        # the vocabulary. A tie with another token counts as correct; float32 logits tie only
        # where two embedding rows give the same dot product, or the decoder's output is zero.
        correct = (target_logit == top).astype(jnp.float32)
        return {
            "loss": jnp.sum((token_loss + token_z_loss) * weights),
            "z_loss": jnp.sum(token_z_loss * weights),
            "correct": jnp.sum(correct * weights),
            "weight": jnp.sum(weights),
        }
