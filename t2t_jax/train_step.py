"""Train state, loss, and the train and eval steps: pure functions of (state, batch, rng).

`Stepper` compiles them either with `jax.jit` over a sharded mesh (the default) or with `pmap`
(data parallel); both run the same `_grads_and_sums` and so give the same updates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from t2t_jax import sharding
from t2t_jax.optimizer import global_norm, make_optimizer, schedule_from_config

Array = jax.Array
Batch = dict[str, Array]
# The device axis of the pmap mode: its collectives, and the layout its inputs are put in.
PMAP_AXIS = "batch"


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds of training: the step (batches seen), params, Adam moments."""

    step: Array
    params: Any
    opt_state: Any


def model_kwargs(batch: Batch) -> dict[str, Array]:
    """Batch features -> keyword arguments of the model's __call__."""
    names = {
        "inputs": "inputs",
        "targets": "targets",
        "inputs_position": "inputs_positions",
        "targets_position": "targets_positions",
        "inputs_segmentation": "inputs_segmentation",
        "targets_segmentation": "targets_segmentation",
    }
    return {arg: batch[key] for key, arg in names.items() if key in batch}


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


DROPOUT_RNGS = ("threefry", "rbg", "unsafe_rbg")


def make_rngs(seed: int, dropout_rng: str = "threefry") -> tuple[Array, Array]:
    """(params init key, dropout key) from the seed; the dropout key is of JAX's PRNG
    implementation `dropout_rng`, drawn from the seed's threefry stream, so each choice gives
    its own masks but the same initial params."""
    if dropout_rng not in DROPOUT_RNGS:
        raise ValueError(
            f"train.dropout_rng must be one of {', '.join(DROPOUT_RNGS)}, got {dropout_rng!r}"
        )
    init_rng, step_rng = jax.random.split(jax.random.key(seed))
    if dropout_rng != "threefry":
        shape = jax.random.key_data(jax.random.key(0, impl=dropout_rng)).shape
        key_data = jax.random.bits(step_rng, shape, jnp.uint32)
        step_rng = jax.random.wrap_key_data(key_data, impl=dropout_rng)
    return init_rng, step_rng


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The pieces a step needs besides (state, batch, rng)."""

    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    label_smoothing: float
    z_loss: float
    grad_accum_steps: int
    # Whether the update itself must be checked for non-finite values (`updates_need_checking`).
    check_updates: bool = True


def _grads_and_sums(
    fns: StepFns, params: Any, batch: Batch, rng: Array, normalizer: Callable[[Array], Array]
) -> tuple[Any, dict[str, Array]]:
    """Gradient of (summed loss / normalizer(summed weight)) and the sums of this batch."""

    def loss_fn(p):
        logits = fns.model.apply(
            {"params": p}, **model_kwargs(batch), deterministic=False, rngs={"dropout": rng}
        )
        sums = cross_entropy_sums(logits, batch, fns.label_smoothing, fns.z_loss)
        return sums["loss"] / normalizer(sums["weight"]), sums

    return jax.grad(loss_fn, has_aux=True)(params)


def _apply(fns: StepFns, state: TrainState, grads: Any, sums: dict) -> tuple[TrainState, dict]:
    """The optimizer update, taken only if the loss, gradients and update are all finite: a
    non-finite step leaves params and optimizer state as they were, counts in `nonfinite`, and
    adds nothing to the loss sums (the loop then stops or goes on, as `train.on_nonfinite`
    says)."""
    with jax.named_scope("optimizer"):  # as profiles name it
        updates, opt_state = fns.tx.update(grads, state.opt_state, state.params)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
        if fns.check_updates:  # else finite by construction: see `updates_need_checking`
            finite &= jnp.isfinite(global_norm(updates))
        keep_if_finite = functools.partial(
            jax.tree.map, lambda new, old: jnp.where(finite, new, old)
        )
        params = keep_if_finite(optax.apply_updates(state.params, updates), state.params)
        opt_state = keep_if_finite(opt_state, state.opt_state)
    metrics = dict(
        keep_if_finite(sums, jax.tree.map(jnp.zeros_like, sums)),
        grad_norm=jnp.where(finite, grad_norm, 0.0),
        learning_rate=fns.schedule(state.step // fns.grad_accum_steps),
        steps=jnp.ones((), jnp.float32),
        nonfinite=1.0 - finite.astype(jnp.float32),
    )
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_step(fns: StepFns, state: TrainState, batch: Batch, rng: Array):
    """One update on a global batch; the dropout rng is `rng` folded with the step."""
    rng = jax.random.fold_in(rng, state.step)
    grads, sums = _grads_and_sums(
        fns, state.params, batch, rng, lambda w: jnp.maximum(w, 1.0)
    )
    return _apply(fns, state, grads, sums)


def pmap_train_step(fns: StepFns, state: TrainState, batch: Batch, rng: Array):
    """`train_step` for one device of a pmap over axis PMAP_AXIS: gradients are summed across
    devices and normalised by the global token count, as the jit step does. Dropout masks are
    drawn per device, so the two steps agree exactly only without dropout."""
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(PMAP_AXIS))
    grads, sums = _grads_and_sums(
        fns,
        state.params,
        batch,
        rng,
        lambda w: jnp.maximum(jax.lax.psum(w, PMAP_AXIS), 1.0),
    )
    grads = jax.lax.psum(grads, PMAP_AXIS)
    sums = jax.lax.psum(sums, PMAP_AXIS)
    return _apply(fns, state, grads, sums)


def eval_step(fns: StepFns, params: Any, batch: Batch) -> dict[str, Array]:
    """Loss and accuracy sums of a batch, without dropout."""
    logits = fns.model.apply({"params": params}, **model_kwargs(batch), deterministic=True)
    return cross_entropy_sums(logits, batch, fns.label_smoothing, fns.z_loss)


@jax.jit
def accumulate(sums: dict[str, Array] | None, metrics: dict[str, Array]) -> dict[str, Array]:
    """Running sums of step metrics, in one dispatch per step rather than one per metric."""
    return metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)


def make_step_fns(config: Any, model: nn.Module, d_model: int) -> StepFns:
    """The step's pieces from a config: the paper's optimizer and schedule, the loss settings."""
    return StepFns(
        model=model,
        tx=make_optimizer(config.train, d_model),
        schedule=schedule_from_config(config.train, d_model),
        label_smoothing=config.train.label_smoothing,
        z_loss=config.train.z_loss,
        grad_accum_steps=config.train.grad_accum_steps,
        check_updates=updates_need_checking(config.train),
    )


def updates_need_checking(train_config: Any) -> bool:
    """Whether the finite guard must check Adam's update itself, a reduction over every
    parameter that the guarded writes wait for (a kernel per parameter array on a GPU).

    With finite gradients (checked), a finite learning rate, eps > 0 in float32 and betas in
    [0, 1), the update is finite: the moments average finite gradients, the bias corrections
    are positive, and the denominator is at least eps. Otherwise it may not be: eps = 0 gives
    0/0 where a gradient and its moments are all zero, an infinite rate inf * 0."""
    eps_ok = np.float32(train_config.adam_eps) >= np.finfo(np.float32).tiny
    betas_ok = all(0.0 <= b < 1.0 for b in (train_config.adam_b1, train_config.adam_b2))
    return not (eps_ok and betas_ok and np.isfinite(train_config.learning_rate))


def init_boxed_params(model: nn.Module, rng: Array, lengths: dict[str, int]) -> Any:
    """Initial params with their logical-axis boxes (`nn.LogicallyPartitioned`)."""
    dummy = {k: jnp.ones((1, v), jnp.int32) for k, v in lengths.items() if k != "loss_mask"}
    return model.init({"params": rng}, **dummy, deterministic=True)["params"]


class Stepper:
    """Creates the train state on the devices and runs the compiled steps on it.

    mode "jit": the state is sharded over `mesh` as the logical axis rules ask, batches are
    global arrays split over (data, fsdp). mode "pmap": the state is replicated on the local
    devices and batches are split over them.
    """

    def __init__(self, fns: StepFns, mesh: Mesh, mode: str, lengths: dict[str, int]):
        if mode not in ("jit", "pmap"):
            raise ValueError(f"train.mode must be 'jit' or 'pmap', got {mode!r}")
        self.fns, self.mesh, self.mode, self.lengths = fns, mesh, mode, lengths
        self.abstract_state, self.state_shardings = self._abstract_state()
        if mode == "jit":
            batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
            self._train = jax.jit(
                lambda s, b, r: train_step(fns, s, b, r),
                in_shardings=(self.state_shardings, batch_sh, repl),
                out_shardings=(self.state_shardings, repl),
                donate_argnums=(0,),
            )
            self._eval = jax.jit(
                lambda p, b: eval_step(fns, p, b),
                in_shardings=(self.state_shardings.params, batch_sh),
                out_shardings=repl,
            )
        else:
            self._train = jax.pmap(
                lambda s, b, r: pmap_train_step(fns, s, b, r),
                axis_name=PMAP_AXIS,
                in_axes=(0, 0, None),
                donate_argnums=(0,),
            )
            self._eval = jax.pmap(
                lambda p, b: jax.lax.psum(eval_step(fns, p, b), PMAP_AXIS), axis_name=PMAP_AXIS
            )

    @functools.cached_property
    def batch_shard(self) -> tuple[int, int]:
        """Which block of each global batch this process feeds: (index, count). Asked only when
        feeding, so that a mesh of devices this process does not own (a TPU topology compiled
        for ahead of time) still builds the steps."""
        if self.mode == "jit":
            return sharding.batch_shard(self.mesh)
        return jax.process_index(), jax.process_count()

    def activate(self) -> contextlib.AbstractContextManager:
        """The context the steps run in: the mesh and axis rules under jit; none under pmap,
        which makes its own device axis."""
        return sharding.activate(self.mesh) if self.mode == "jit" else contextlib.nullcontext()

    def _abstract_state(self) -> tuple[TrainState, TrainState]:
        """Shapes of the state, and the shardings its params' logical axes ask for."""
        with sharding.activate(self.mesh):  # traced for the mesh's platform, as the steps are
            boxed = jax.eval_shape(
                lambda: init_boxed_params(self.fns.model, jax.random.key(0), self.lengths)
            )
        param_shardings = sharding.logical_to_sharding(boxed, self.mesh)
        abstract = jax.eval_shape(lambda: self._state_from_params(nn.meta.unbox(boxed)))
        repl = sharding.replicated(self.mesh)
        opt_shardings = optax.tree_map_params(
            self.fns.tx,
            lambda _, s: s,
            abstract.opt_state,
            param_shardings,
            transform_non_params=lambda _: repl,
            is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
        )
        shardings = TrainState(step=repl, params=param_shardings, opt_state=opt_shardings)
        return abstract, shardings

    def _state_from_params(self, params: Any) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.fns.tx.init(params)
        )

    def init_state(self, rng: Array) -> TrainState:
        """Fresh state, created directly in its sharded (jit) or replicated (pmap) layout."""
        def init(r):
            return self._state_from_params(
                nn.meta.unbox(init_boxed_params(self.fns.model, r, self.lengths))
            )

        state = jax.jit(init, out_shardings=self.state_shardings)(rng)
        return self.to_devices(state)

    def to_devices(self, state: TrainState) -> TrainState:
        """A state in the checkpoint layout (global, sharded) -> this stepper's layout."""
        if self.mode == "jit":
            return state
        count = jax.local_device_count()
        return jax.tree.map(
            lambda x: jax.device_put(np.broadcast_to(x, (count, *np.shape(x))), self._pmap_split),
            jax.device_get(state),
        )

    def to_checkpoint(self, state: TrainState) -> TrainState:
        """This stepper's layout -> the checkpoint layout (one global value per leaf)."""
        if self.mode == "jit":
            return state
        return jax.device_put(
            jax.tree.map(lambda x: x[0], state), self.state_shardings
        )

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> Batch:
        """Host rows -> device arrays laid out for the step (started asynchronously)."""
        if self.mode == "jit":
            return sharding.global_batch(local_batch, self.mesh, self.batch_shard[1])
        n = jax.local_device_count()
        return {
            k: jax.device_put(v.reshape(n, -1, *v.shape[1:]), self._pmap_split)
            for k, v in local_batch.items()
        }

    def put_replicated(self, value: Any) -> Any:
        """A value every step takes whole (the dropout key), committed to all the devices once
        so that steps do not copy it (jit across processes too, which device_put cannot do)."""
        if self.mode == "jit":
            return jax.jit(lambda v: v, out_shardings=sharding.replicated(self.mesh))(value)
        everywhere = jax.sharding.NamedSharding(self._pmap_split.mesh, jax.sharding.PartitionSpec())
        return jax.device_put(value, everywhere)

    @functools.cached_property
    def _pmap_split(self) -> jax.sharding.NamedSharding:
        """Leading axis over the local devices: the layout of pmap's outputs (its axis name
        included), so that inputs put there take the step's compiled path every time."""
        mesh = Mesh(np.array(jax.local_devices()), (PMAP_AXIS,))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(PMAP_AXIS))

    @property
    def jitted_train_step(self) -> Callable:
        """The compiled-on-first-call train step itself, e.g. to `.lower()` it for analysis."""
        return self._train

    def train(self, state: TrainState, batch: Batch, rng: Array) -> tuple[TrainState, dict]:
        """One step; metrics stay on the devices (under pmap one identical copy per device):
        add them with `accumulate`, read them with `fetch_metrics`."""
        return self._train(state, batch, rng)

    def fetch_metrics(self, metrics: dict[str, Array]) -> dict[str, np.ndarray]:
        """Metrics (or their running sums) on the host, as one value each."""
        host = jax.device_get(metrics)
        return jax.tree.map(lambda x: x[0], host) if self.mode == "pmap" else host

    def evaluate(self, state: TrainState, batch: Batch) -> dict[str, Array]:
        """Loss sums of an eval batch, on the devices like `train`'s metrics."""
        return self._eval(state.params, batch)

    def params(self, state: TrainState) -> Any:
        """Params usable by a plain `jax.jit` function (e.g. decoding)."""
        return state.params if self.mode == "jit" else jax.tree.map(lambda x: x[0], state.params)
