"""Train state, and the train and eval steps: pure functions of (state, batch, rng) over the
loss of `loss.py`.

A `Stepper` compiles them and keeps the state in its layout: `JitStepper` with `jax.jit` over a
sharded mesh (the default), `PmapStepper` with `pmap` (data parallel). Both run the same
`_grads_and_sums`, and so give the same updates; `make_stepper` picks one by `train.mode`.
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
from t2t_jax.loss import cross_entropy_sums
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
    """Creates the train state on the devices and runs the compiled steps on it. Two
    implementations, one interface: `JitStepper` (the state sharded over the mesh as the logical
    axis rules ask, batches global arrays split over (data, fsdp)) and `PmapStepper` (the state
    replicated on the local devices, batches split over them). `make_stepper` picks one."""

    mode: str

    def __init__(self, fns: StepFns, mesh: Mesh, lengths: dict[str, int]):
        self.fns, self.mesh, self.lengths = fns, mesh, lengths
        self.abstract_state, self.state_shardings = self._abstract_state()
        self._train, self._eval = self._compile()

    def _compile(self) -> tuple[Callable, Callable]:
        """(train step, eval step), compiled on first call."""
        raise NotImplementedError

    @functools.cached_property
    def batch_shard(self) -> tuple[int, int]:
        """Which block of each global batch this process feeds: (index, count). Asked only when
        feeding, so that a mesh of devices this process does not own (a TPU topology compiled
        for ahead of time) still builds the steps."""
        return jax.process_index(), jax.process_count()

    def activate(self) -> contextlib.AbstractContextManager:
        """The context the steps run in."""
        return contextlib.nullcontext()

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
        """Fresh state, created directly in this stepper's layout."""
        def init(r):
            return self._state_from_params(
                nn.meta.unbox(init_boxed_params(self.fns.model, r, self.lengths))
            )

        state = jax.jit(init, out_shardings=self.state_shardings)(rng)
        return self.to_devices(state)

    def to_devices(self, state: TrainState) -> TrainState:
        """A state in the checkpoint layout (global, sharded) -> this stepper's layout."""
        raise NotImplementedError

    def to_checkpoint(self, state: TrainState) -> TrainState:
        """This stepper's layout -> the checkpoint layout (one global value per leaf)."""
        raise NotImplementedError

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> Batch:
        """Host rows -> device arrays laid out for the step (started asynchronously)."""
        raise NotImplementedError

    def put_replicated(self, value: Any) -> Any:
        """A value every step takes whole (the dropout key), committed to all the devices once
        so that steps do not copy it."""
        raise NotImplementedError

    @property
    def jitted_train_step(self) -> Callable:
        """The compiled-on-first-call train step itself, e.g. to `.lower()` it for analysis."""
        return self._train

    def train(self, state: TrainState, batch: Batch, rng: Array) -> tuple[TrainState, dict]:
        """One step; metrics stay on the devices: add them with `accumulate`, read them with
        `fetch_metrics`."""
        return self._train(state, batch, rng)

    def fetch_metrics(self, metrics: dict[str, Array]) -> dict[str, np.ndarray]:
        """Metrics (or their running sums) on the host, as one value each."""
        return jax.device_get(metrics)

    def evaluate(self, state: TrainState, batch: Batch) -> dict[str, Array]:
        """Loss sums of an eval batch, on the devices like `train`'s metrics."""
        return self._eval(state.params, batch)

    def params(self, state: TrainState) -> Any:
        """Params usable by a plain `jax.jit` function (e.g. decoding)."""
        return state.params

    def host_params(self, state: TrainState) -> Any:
        """The params as numpy on every host (here: all on this host's devices)."""
        return jax.device_get(self.params(state))


class JitStepper(Stepper):
    """The steps under `jax.jit` over the mesh: state sharded by the logical axis rules,
    batches global arrays split over (data, fsdp); the checkpoint layout is its own."""

    mode = "jit"

    def _compile(self) -> tuple[Callable, Callable]:
        fns, batch_sh, repl = self.fns, sharding.batch_sharding(self.mesh), sharding.replicated(
            self.mesh)
        train = jax.jit(lambda s, b, r: train_step(fns, s, b, r),
                        in_shardings=(self.state_shardings, batch_sh, repl),
                        out_shardings=(self.state_shardings, repl), donate_argnums=(0,))
        evaluate = jax.jit(lambda p, b: eval_step(fns, p, b),
                           in_shardings=(self.state_shardings.params, batch_sh),
                           out_shardings=repl)
        return train, evaluate

    @functools.cached_property
    def batch_shard(self) -> tuple[int, int]:
        return sharding.batch_shard(self.mesh)

    def activate(self) -> contextlib.AbstractContextManager:
        return sharding.activate(self.mesh)  # the mesh and its axis rules

    def to_devices(self, state: TrainState) -> TrainState:
        return state

    def to_checkpoint(self, state: TrainState) -> TrainState:
        return state

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> Batch:
        return sharding.global_batch(local_batch, self.mesh, self.batch_shard[1])

    def put_replicated(self, value: Any) -> Any:
        # A jitted identity, which (unlike device_put) commits across processes too.
        return jax.jit(lambda v: v, out_shardings=sharding.replicated(self.mesh))(value)

    def host_params(self, state: TrainState) -> Any:
        """The params as numpy on every host, gathered from the devices of all processes."""
        if jax.process_count() == 1:
            return jax.device_get(state.params)
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(state.params, tiled=True)


class PmapStepper(Stepper):
    """The steps under `jax.pmap` (data parallel): the state replicated on the local devices,
    each batch split over them; gradients and metrics summed over PMAP_AXIS."""

    mode = "pmap"

    def _compile(self) -> tuple[Callable, Callable]:
        fns = self.fns
        train = jax.pmap(lambda s, b, r: pmap_train_step(fns, s, b, r), axis_name=PMAP_AXIS,
                         in_axes=(0, 0, None), donate_argnums=(0,))
        evaluate = jax.pmap(lambda p, b: jax.lax.psum(eval_step(fns, p, b), PMAP_AXIS),
                            axis_name=PMAP_AXIS)
        return train, evaluate

    def to_devices(self, state: TrainState) -> TrainState:
        count = jax.local_device_count()
        return jax.tree.map(
            lambda x: jax.device_put(np.broadcast_to(x, (count, *np.shape(x))), self._split),
            jax.device_get(state),
        )

    def to_checkpoint(self, state: TrainState) -> TrainState:
        return jax.device_put(jax.tree.map(lambda x: x[0], state), self.state_shardings)

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> Batch:
        n = jax.local_device_count()
        return {k: jax.device_put(v.reshape(n, -1, *v.shape[1:]), self._split)
                for k, v in local_batch.items()}

    def put_replicated(self, value: Any) -> Any:
        everywhere = jax.sharding.NamedSharding(self._split.mesh, jax.sharding.PartitionSpec())
        return jax.device_put(value, everywhere)

    @functools.cached_property
    def _split(self) -> jax.sharding.NamedSharding:
        """Leading axis over the local devices: the layout of pmap's outputs (its axis name
        included), so that inputs put there take the step's compiled path every time."""
        mesh = Mesh(np.array(jax.local_devices()), (PMAP_AXIS,))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(PMAP_AXIS))

    def fetch_metrics(self, metrics: dict[str, Array]) -> dict[str, np.ndarray]:
        return jax.tree.map(lambda x: x[0], jax.device_get(metrics))  # one copy per device

    def params(self, state: TrainState) -> Any:
        return jax.tree.map(lambda x: x[0], state.params)


STEPPERS: dict[str, type[Stepper]] = {"jit": JitStepper, "pmap": PmapStepper}


def make_stepper(fns: StepFns, mesh: Mesh, mode: str, lengths: dict[str, int]) -> Stepper:
    """The Stepper of `train.mode`: "jit" (sharded over the mesh) or "pmap" (data parallel)."""
    if mode not in STEPPERS:
        raise ValueError(f"train.mode must be 'jit' or 'pmap', got {mode!r}")
    return STEPPERS[mode](fns, mesh, lengths)
