"""Loss, schedule, accumulation, the training loop, resuming, and metrics files."""

import collections
import functools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t2t_jax import checkpoint, run_config
from t2t_jax.loss import cross_entropy_sums
from t2t_jax.optimizer import make_optimizer, paper_schedule
from t2t_jax.train import build_experiment, restore_or_init, train_and_evaluate


def test_schedule_is_the_papers_formula():
    schedule = paper_schedule(d_model=512, warmup_steps=4000)
    for step in (1, 100, 4000, 4001, 100_000):
        expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
        assert float(schedule(step - 1)) == pytest.approx(expected, rel=1e-5)
    assert float(paper_schedule(512, 4000, scale=2.0)(9)) == pytest.approx(
        2 * float(schedule(9)), rel=1e-6
    )


def test_cooldown_falls_linearly_to_zero_over_the_last_steps():
    paper = paper_schedule(d_model=128, warmup_steps=300)
    cooled = paper_schedule(128, 300, num_steps=1500, cooldown_fraction=1 / 3)
    for count in (0, 299, 999):  # before the cooldown: the paper's rate
        assert float(cooled(count)) == pytest.approx(float(paper(count)), rel=1e-6)
    for count in (1000, 1250, 1499):
        factor = (1500 - count) / 500
        assert float(cooled(count)) == pytest.approx(factor * float(paper(count)), rel=1e-5)
    assert float(cooled(1500)) == 0.0
    with pytest.raises(ValueError, match="cooldown_fraction must be in"):
        paper_schedule(128, 300, num_steps=100, cooldown_fraction=1.5)


def test_optimizer_is_adam_with_the_papers_betas(tiny_config):
    tx = make_optimizer(tiny_config.train, d_model=32)
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    updates, _ = tx.update(grads, tx.init(params), params)
    reference = optax.adam(paper_schedule(32, 10), b1=0.9, b2=0.98, eps=1e-9)
    expected, _ = reference.update(grads, reference.init(params), params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)


def test_global_norm_and_clipping_equal_optaxs_over_arrays_of_mixed_shapes(tiny_config):
    from t2t_jax.optimizer import clip_by_global_norm, global_norm

    keys = jax.random.split(jax.random.key(0), 6)
    shapes = [(), (5,), (5,), (3, 4), (4, 3), (3, 4)]  # repeated shapes share a reduction
    tree = {f"x{i}": 3 * jax.random.normal(k, shape) for i, (k, shape) in enumerate(
        zip(keys, shapes, strict=True))}
    tree["half"] = jnp.array([1.5, -2.25], jnp.bfloat16)
    expected = optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
    norm = jax.jit(global_norm)(tree)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(norm, expected, rtol=1e-6)
    for max_norm in (0.5 * float(expected), 2.0 * float(expected)):  # clipped, then not
        ours, theirs = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
        assert ours.init(tree) == theirs.init(tree)  # checkpoints keep their layout
        clipped = ours.update(tree, ours.init(tree))[0]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            np.float32(a), np.float32(b), rtol=1e-6), clipped, theirs.update(tree, None)[0])
    # In the optimizer: two steps, the first clipped (norm 50 to 1), against optax's chain.
    tiny_config.train.grad_clip_norm = 1.0
    adam = optax.adam(paper_schedule(32, 10), b1=0.9, b2=0.98, eps=1e-9)
    runs = {}
    for name, tx in [("ours", make_optimizer(tiny_config.train, d_model=32)),
                     ("optax", optax.chain(optax.clip_by_global_norm(1.0), adam)),
                     ("unclipped", adam)]:
        state = tx.init({"w": jnp.zeros(2)})
        for grad in ([30.0, -40.0], [0.3, 0.1]):
            updates, state = tx.update({"w": jnp.array(grad)}, state)
        runs[name] = updates["w"]
    np.testing.assert_allclose(runs["ours"], runs["optax"], rtol=1e-6)
    assert np.abs(runs["ours"] - runs["unclipped"]).max() > 1e-4


@pytest.mark.parametrize(
    "adam_eps, learning_rate, checked",
    [
        (1e-9, 1.0, False),  # finite by construction: no pass over the updates
        (1e-9, float("inf"), True),  # inf * 0 where moments are zero
        (0.0, 1.0, True),  # 0/0 where gradients are zero
        (1e-50, 1.0, True),  # eps that is 0 in float32
    ],
)
def test_the_finite_guard_skips_a_step_whose_update_would_not_be_finite(
    tiny_config, adam_eps, learning_rate, checked
):
    import dataclasses

    from t2t_jax.train_step import TrainState, _apply, make_step_fns

    tiny_config.train.update(adam_eps=adam_eps, learning_rate=learning_rate)
    fns = make_step_fns(tiny_config, model=None, d_model=32)
    assert fns.check_updates == checked
    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=fns.tx.init(params))
    grads = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.zeros(2)}  # "b": a param not used
    sums = {"loss": jnp.float32(2.0), "weight": jnp.float32(4.0)}

    def apply(step_fns):
        return jax.jit(functools.partial(_apply, step_fns))(state, grads, sums)

    new, metrics = apply(fns)
    assert all(bool(jnp.all(jnp.isfinite(leaf)))
               for leaf in jax.tree.leaves((new.params, new.opt_state)))
    unchecked, _ = apply(dataclasses.replace(fns, check_updates=False))
    if checked:  # the update would not be finite: the step is skipped, the state kept
        assert not bool(jnp.all(jnp.isfinite(unchecked.params["b"])))
        assert float(metrics["nonfinite"]) == 1.0 and float(metrics["loss"]) == 0.0
        jax.tree.map(np.testing.assert_array_equal, new.params, params)
        assert int(new.step) == 1
    else:
        assert float(metrics["nonfinite"]) == 0.0
        assert not np.allclose(new.params["w"], 1.0)
        jax.tree.map(np.testing.assert_array_equal, new.params, unchecked.params)


@pytest.mark.parametrize("path", ["auto", "one_pass", "exp_saving"])
def test_vocab_statistics_agree_with_separate_reductions_and_their_gradients(path):
    from t2t_jax.loss import vocab_statistics

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 4099)).astype(np.float32)  # a length XLA splits unevenly
    logits[0, [7, 4000]] = 9.0  # a tie for the largest, the target one of them
    logits[1, :] = -np.inf
    logits[1, 5] = 0.0
    logits[2, [3, 3000]] = np.nan
    logits[3, 11] = np.inf
    targets = np.array([7, 5, 3, 2, 0, 4098])
    statistics = jax.jit(vocab_statistics, static_argnums=2)
    log_z, target_logit, total, top = (
        np.asarray(x) for x in statistics(jnp.asarray(logits), jnp.asarray(targets), path))
    # Row 2's largest is NaN or not as the platform's max treats NaN: its log Z is NaN either
    # way, and so is the loss, which the finite guard then drops.
    without_nan = [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(top[without_nan], np.max(logits[without_nan], axis=-1))
    expected = np.asarray(jax.nn.logsumexp(logits, axis=-1))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(log_z[finite], expected[finite], rtol=1e-6)
    assert np.isnan(log_z[2]) and not np.isfinite(log_z[3])
    np.testing.assert_allclose(target_logit, logits[np.arange(6), targets], rtol=1e-6)
    assert (target_logit == top).tolist() == [True, True, False, False, False, False]
    rows = [0, 4, 5]
    np.testing.assert_allclose(total[rows], logits[rows].sum(-1), rtol=1e-4, atol=1e-3)

    # Gradients of a weighted sum of the three differentiable outputs, against autodiff of the
    # separate reductions, on the finite rows.
    finite_logits, finite_targets = jnp.asarray(logits[rows]), jnp.asarray(targets[rows])
    weights = jnp.asarray([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-1.0, 3.0, 0.125]])

    def combined(outputs):
        return jnp.sum(weights * jnp.stack(outputs[:3], axis=-1))

    def separate(x):
        return (jax.nn.logsumexp(x, axis=-1),
                jnp.take_along_axis(x, finite_targets[:, None], -1)[:, 0], jnp.sum(x, axis=-1))

    grad = jax.jit(jax.grad(lambda x: combined(vocab_statistics(x, finite_targets, path))))(
        finite_logits)
    reference = jax.grad(lambda x: combined(separate(x)))(finite_logits)
    np.testing.assert_allclose(grad, reference, rtol=1e-5, atol=1e-7)


def test_vocab_statistics_saves_the_exps_on_the_cpu_only():
    """On the CPU the backward pass computes no exp of its own (the exp-saving path); lowered
    for a TPU or a GPU it does (the one-pass path; `test_gpu_aot` counts its kernels)."""
    from t2t_jax.loss import vocab_statistics

    logits = jnp.zeros((4, 997), jnp.float32)
    targets = jnp.zeros((4,), jnp.int32)

    def exps(path):
        step = jax.jit(jax.grad(lambda x: jnp.sum(vocab_statistics(x, targets, path)[0])))
        text = step.lower(logits).as_text()  # StableHLO, before XLA fuses or rewrites
        return text.count("stablehlo.exponential")

    assert exps("auto") == exps("exp_saving") == 1
    assert exps("one_pass") == 3  # twice in the merge of the reduction, once backward
    step = jax.jit(jax.grad(lambda x: jnp.sum(vocab_statistics(x, targets)[0])))
    for platform in ("tpu", "cuda"):
        text = step.trace(logits).lower(lowering_platforms=(platform,)).as_text()
        assert text.count("stablehlo.exponential") == 3, platform


@pytest.mark.parametrize("path", ["one_pass", "exp_saving"])
def test_targets_outside_the_vocabulary_have_logit_and_gradient_zero(path):
    from t2t_jax.loss import vocab_statistics

    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 11)), jnp.float32)
    targets = jnp.asarray([11, -1, 3])

    def target_logits(x):
        return vocab_statistics(x, targets, path)[1]

    np.testing.assert_array_equal(target_logits(logits), [0.0, 0.0, logits[2, 3]])
    grad = jax.grad(lambda x: jnp.sum(target_logits(x)))(logits)
    np.testing.assert_array_equal(grad, np.eye(11)[[3]] * np.array([[0], [0], [1]]))


def test_label_smoothed_loss_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = np.array([[1, 4, 0], [2, 2, 3]])
    eps = 0.1
    sums = cross_entropy_sums(jnp.asarray(logits), {"targets": jnp.asarray(targets)}, eps, 0.0)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    q = np.full((2, 3, 5), eps / 4)
    np.put_along_axis(q, targets[..., None], 1 - eps, axis=-1)
    kl = (q * (np.log(q) - log_p)).sum(-1)  # cross-entropy minus the entropy of q
    weights = targets > 0
    assert float(sums["loss"]) == pytest.approx((kl * weights).sum(), rel=1e-5)
    assert float(sums["weight"]) == 5
    assert float(sums["correct"]) == ((logits.argmax(-1) == targets) * weights).sum()


def test_z_loss_adds_log_z_squared():
    logits = jnp.array([[[2.0, 0.0, 1.0]]])
    batch = {"targets": jnp.array([[1]])}
    plain = cross_entropy_sums(logits, batch, 0.0, 0.0)
    with_z = cross_entropy_sums(logits, batch, 0.0, 1e-2)
    log_z = float(jax.nn.logsumexp(logits))
    assert float(with_z["loss"] - plain["loss"]) == pytest.approx(1e-2 * log_z**2, rel=1e-5)


def one_hot_cross_entropy_sums(logits, batch, label_smoothing, z_loss):
    """The loss as first written: a soft-target [.., vocab] array times log-softmax."""
    targets, vocab = batch["targets"], logits.shape[-1]
    weights = (targets > 0).astype(jnp.float32)
    confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    soft_targets = jax.nn.one_hot(targets, vocab) * (confidence - low) + low
    log_z = jax.nn.logsumexp(logits, axis=-1)
    token_loss = -jnp.sum(soft_targets * (logits - log_z[..., None]), axis=-1) - entropy
    token_z_loss = z_loss * jnp.square(log_z)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "loss": jnp.sum((token_loss + token_z_loss) * weights),
        "z_loss": jnp.sum(token_z_loss * weights),
        "correct": jnp.sum(correct * weights),
        "weight": jnp.sum(weights),
    }


@pytest.mark.parametrize("label_smoothing,z_loss", [(0.1, 0.0), (0.0, 0.0), (0.1, 1e-3)])
def test_loss_without_one_hot_equals_the_one_hot_formula(label_smoothing, z_loss):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(4 * rng.normal(size=(3, 7, 301)), jnp.float32)
    targets = jnp.asarray(rng.integers(1, 301, size=(3, 7)), jnp.int32).at[:, 5:].set(0)
    batch = {"targets": targets}

    def loss(fn, x):
        sums = fn(x, batch, label_smoothing, z_loss)
        return sums["loss"], sums

    (new, new_sums), new_grad = jax.value_and_grad(
        lambda x: loss(cross_entropy_sums, x), has_aux=True)(logits)
    (old, old_sums), old_grad = jax.value_and_grad(
        lambda x: loss(one_hot_cross_entropy_sums, x), has_aux=True)(logits)
    assert float(new) == pytest.approx(float(old), rel=1e-6)
    for key in old_sums:
        assert float(new_sums[key]) == pytest.approx(float(old_sums[key]), rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(new_grad, old_grad, rtol=1e-5, atol=1e-7)


def vocab_sized_broadcasts(hlo_text: str, vocab: int) -> list[str]:
    """Arrays of [.., vocab] that the compiled program writes to memory although none of their
    inputs is [.., vocab] sized: one-hot or soft-target arrays built from the token ids (the
    matmul that makes the logits is a dot or a library call, not a loop fusion)."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    shapes = dict(re.findall(r"%(\S+) = (\w+\[[^\]]*\])", entry))
    found = []
    for match in re.finditer(
        r"%(\S+) = (\w+\[[^\]]*\])\S* fusion\(([^)]*)\), kind=kLoop", entry
    ):
        name, shape, operands = match.groups()
        if not shape.endswith(f",{vocab}]"):
            continue
        operand_shapes = [shapes.get(o.strip().lstrip("%"), "") for o in operands.split(",")]
        if not any(s.endswith(f",{vocab}]") for s in operand_shapes):
            found.append(name)
    return found


def compiled_train_step_text(config, vocab, rows=4, length=16):
    from t2t_jax import sharding
    from t2t_jax.model import ModelConfig, build_model
    from t2t_jax.train_step import JitStepper, make_step_fns

    model_config = ModelConfig.from_config(config.model, vocab)
    fns = make_step_fns(config, build_model(model_config), model_config.d_model)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    stepper = JitStepper(fns, mesh, {"inputs": length, "targets": length})
    batch = {k: jnp.ones((rows, length), jnp.int32) for k in ("inputs", "targets")}
    with stepper.activate():
        lowered = stepper.jitted_train_step.lower(stepper.abstract_state, batch,
                                                  jax.random.key(1))
    return lowered.compile().as_text()


def test_compiled_train_step_holds_no_one_hot_array(tiny_config, monkeypatch):
    from t2t_jax import train_step

    vocab = 997  # a size no other dimension has
    assert vocab_sized_broadcasts(compiled_train_step_text(tiny_config, vocab), vocab) == []
    # The check does find them in the step as first written (soft targets, and their product
    # with the loss's gradient in the backward pass).
    monkeypatch.setattr(train_step, "cross_entropy_sums", one_hot_cross_entropy_sums)
    assert len(vocab_sized_broadcasts(compiled_train_step_text(tiny_config, vocab), vocab)) >= 1


def first_batch(config):
    from t2t_jax.data import loader, prepare, tasks
    from t2t_jax.data.batching import Position

    split = prepare.open_or_prepare(
        config.data, tasks.tokenizer_from_config(config.data)).split("train")
    batches = loader.TrainInput(split, loader.make_planner(config, split), Position())
    batch = next(batches)
    batches.close()
    return batch


def run_two_steps(config, batch):
    exp = build_experiment(config, jax.devices()[:1])
    with exp.stepper.activate():
        state = exp.stepper.init_state(jax.random.key(0))
        for _ in range(config.train.grad_accum_steps):
            state, _ = exp.stepper.train(state, exp.stepper.put_batch(batch), jax.random.key(1))
    return state


def test_accumulating_one_batch_twice_equals_one_step_on_it(tiny_config):
    batch = first_batch(tiny_config)
    single = run_two_steps(tiny_config, batch)
    tiny_config.train.grad_accum_steps = 2
    accumulated = run_two_steps(tiny_config, batch)
    assert int(accumulated.step) == 2
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), accumulated.params, single.params
    )


def test_dropout_rngs_are_deterministic_and_distinct():
    from t2t_jax.model import ModelConfig, build_model
    from t2t_jax.train_step import make_rngs

    model = build_model(ModelConfig(vocab_size=20, num_encoder_layers=1, num_decoder_layers=1,
                                    d_model=32, d_ff=64, num_heads=4, dropout_rate=0.3))
    tokens = jnp.arange(1, 15, dtype=jnp.int32).reshape(2, 7)
    params = model.init(jax.random.key(0), tokens, tokens)["params"]

    def logits(dropout_rng, step):
        init_rng, rng = make_rngs(0, dropout_rng)
        return model.apply({"params": params}, tokens, tokens, deterministic=False,
                           rngs={"dropout": jax.random.fold_in(rng, step)})

    outputs = {}
    for impl in ("threefry", "rbg", "unsafe_rbg"):
        outputs[impl] = logits(impl, 1)
        np.testing.assert_array_equal(outputs[impl], logits(impl, 1))  # same seed and step
        assert not np.allclose(outputs[impl], logits(impl, 2))  # a new mask every step
    assert not np.allclose(outputs["threefry"], outputs["rbg"])
    assert not np.allclose(outputs["rbg"], outputs["unsafe_rbg"])
    # Initial params do not depend on the choice.
    assert all(
        np.array_equal(jax.random.key_data(make_rngs(0, impl)[0]),
                       jax.random.key_data(make_rngs(0)[0]))
        for impl in ("rbg", "unsafe_rbg")
    )
    with pytest.raises(ValueError, match="train.dropout_rng must be one of"):
        make_rngs(0, "philox")


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_steps_compile_once_across_logging_eval_and_checkpoints(
    tiny_config, tmp_path, monkeypatch, mode
):
    from t2t_jax import train_step

    traces = collections.Counter()

    def counted(name, function):
        def traced(*args, **kwargs):
            traces[name] += 1
            return function(*args, **kwargs)
        return traced

    for name in ("train_step", "pmap_train_step", "eval_step"):
        monkeypatch.setattr(train_step, name, counted(name, getattr(train_step, name)))
    tiny_config.train.mode = mode
    tiny_config.train.update(num_steps=6, log_every=2, eval_every=3, checkpoint_every=2)
    # The loop runs every step under jax.transfer_guard("disallow"): finishing proves that no
    # step copied anything from or to the host behind the program's back.
    train_and_evaluate(tiny_config, str(tmp_path), jax.devices()[:2])
    assert traces["train_step" if mode == "jit" else "pmap_train_step"] == 1
    assert traces["eval_step"] == 2  # one batch shape per split: validation and test


def test_a_host_round_trip_in_the_step_is_an_error(tiny_config, tmp_path, monkeypatch):
    from t2t_jax.train_step import JitStepper

    monkeypatch.setattr(JitStepper, "put_batch", lambda self, batch: batch)  # numpy, unplaced
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        train_and_evaluate(tiny_config, str(tmp_path), jax.devices()[:1])


def final_params(config, workdir):
    exp = build_experiment(config, jax.devices()[:2])
    manager = checkpoint.make_manager(workdir, config.train)
    with exp.stepper.activate():
        state = restore_or_init(exp, manager, jax.random.key(0))
    manager.close()
    return jax.device_get(state)


@pytest.mark.parametrize("dropout_rng", ["threefry", "unsafe_rbg"])
def test_resumed_run_ends_with_the_same_params(tiny_config, tmp_path, dropout_rng):
    tiny_config.model.dropout_rate = 0.1  # the dropout rng must resume too
    tiny_config.train.dropout_rng = dropout_rng
    tiny_config.data.packing = True  # the packer's position must resume too
    tiny_config.train.num_decode_examples = 0  # three runs: no decode compile in each
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_and_evaluate(tiny_config, straight, jax.devices()[:2])
    tiny_config.train.num_steps = 2
    train_and_evaluate(tiny_config, resumed, jax.devices()[:2])
    # The input position is two integers in the checkpoint, the next batch's epoch and row,
    # beside the key of the prepared ids it indexes.
    from t2t_jax.data import prepare, tasks

    saved = checkpoint.restore_input_position(resumed, 2)
    assert (saved["epoch"], saved["index"]) == (0, 2 * 16)
    tokenizer = tasks.tokenizer_from_config(tiny_config.data)
    assert saved["dataset"] == prepare.find(tiny_config.data, tokenizer).key
    tiny_config.train.num_steps = 4
    train_and_evaluate(tiny_config, resumed, jax.devices()[:2])
    a, b = final_params(tiny_config, straight), final_params(tiny_config, resumed)
    assert int(a.step) == int(b.step) == 4
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a.params, b.params)


def test_a_checkpoint_with_an_old_tf_data_input_state_resumes_with_a_warning(
    tiny_config, tmp_path, caplog
):
    tiny_config.train.num_decode_examples = 0
    tiny_config.train.num_steps = 2
    workdir = str(tmp_path)
    train_and_evaluate(tiny_config, workdir, jax.devices()[:1])
    # As t2t_jax wrote it before 2026-12-04: no input position in the checkpoint, and a
    # tf.data iterator state beside it.
    shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(workdir), "2", "input"))
    os.makedirs(os.path.join(workdir, "input_state", "2", "process_0_of_1"))
    assert checkpoint.restore_input_position(workdir, 2) is None
    tiny_config.train.num_steps = 4
    with caplog.at_level("WARNING"):
        result = train_and_evaluate(tiny_config, workdir, jax.devices()[:1])
    assert result["step"] == 4
    assert any("a tf.data iterator state, which t2t_jax no longer reads" in r.getMessage()
               for r in caplog.records)
    # It went on from where this version's order is after two steps.
    assert checkpoint.restore_input_position(workdir, 4)["index"] == 4 * 16


def test_training_learns_and_writes_metrics_config_and_checkpoints(tiny_config, tmp_path):
    tiny_config.train.num_steps = 60
    tiny_config.train.log_every = 20
    tiny_config.train.eval_every = 60
    tiny_config.train.checkpoint_every = 20
    tiny_config.train.keep_checkpoints = 2
    tiny_config.train.warmup_steps = 20
    tiny_config.train.learning_rate = 0.3
    workdir = str(tmp_path)
    result = train_and_evaluate(tiny_config, workdir, jax.devices()[:1])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [20, 40, 60]
    assert {"accuracy", "learning_rate", "grad_norm", "tokens_per_s", "input_wait_s",
            "step_time_s"} <= set(train_rows[0])
    assert all(0 <= r["input_wait_s"] < 0.5 * r["step_time_s"] for r in train_rows)
    assert train_rows[-1]["loss"] < 0.8 * train_rows[0]["loss"]
    eval_row = next(r for r in rows if "eval_loss" in r)
    assert eval_row["step"] == 60 and 0 < eval_row["eval_accuracy"] <= 1
    assert "test_accuracy" in eval_row
    assert result["eval_accuracy"] == pytest.approx(eval_row["eval_accuracy"])
    assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ["40", "60"]
    saved = run_config.load_config_json(workdir)
    assert saved.model.d_model == 32 and saved.train.num_steps == 60
    assert os.path.exists(os.path.join(workdir, "vocab.txt"))
    assert len(result["samples"]) == 2


def test_metrics_rows_are_readable_while_training_runs(tiny_config, tmp_path, monkeypatch):
    from t2t_jax import evaluate

    seen = []
    run_evals = evaluate.eval_metrics

    def evals_that_read_the_log(exp, state):  # runs at step 4, mid-training
        with open(tmp_path / "metrics.jsonl") as f:
            seen.extend(json.loads(line)["step"] for line in f)
        return run_evals(exp, state)

    monkeypatch.setattr(evaluate, "eval_metrics", evals_that_read_the_log)
    tiny_config.train.update(num_steps=6, log_every=2, eval_every=4, checkpoint_every=6)
    train_and_evaluate(tiny_config, str(tmp_path), jax.devices()[:1])
    assert seen[:2] == [2, 4]  # rows of steps 2 and 4 on disk before training ended


def test_corrupt_checkpoint_is_a_clear_error(tiny_config, tmp_path):
    workdir = str(tmp_path)
    tiny_config.train.num_steps = 2
    train_and_evaluate(tiny_config, workdir, jax.devices()[:1])
    state_dir = os.path.join(checkpoint.checkpoint_dir(workdir), "2", "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    tiny_config.train.num_steps = 4
    with pytest.raises(ValueError, match="could not be restored.*fresh workdir"):
        train_and_evaluate(tiny_config, workdir, jax.devices()[:1])


def test_packed_and_padded_batches_give_the_same_per_example_loss():
    from flax import linen as nn

    from t2t_jax.model import ModelConfig, build_model

    model = build_model(ModelConfig(vocab_size=20, num_encoder_layers=1, num_decoder_layers=1,
                                    d_model=32, d_ff=64, num_heads=4, dropout_rate=0.0))
    src = [np.array([5, 6, 7, 1]), np.array([8, 9, 1])]
    tgt = [np.array([7, 6, 1]), np.array([9, 8, 5, 1])]
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.ones((1, 7), jnp.int32),
                                      jnp.ones((1, 7), jnp.int32))["params"])

    def loss(batch):
        logits = model.apply({"params": params}, **{
            k.replace("_position", "_positions"): v for k, v in batch.items()
        })
        return cross_entropy_sums(logits, batch, 0.1, 0.0)

    padded = [loss({"inputs": jnp.asarray(s)[None], "targets": jnp.asarray(t)[None]})
              for s, t in zip(src, tgt, strict=True)]
    from t2t_jax.data import batching

    layout = batching.Layout(batching.Lengths(8, 8), packing=True)
    sizes = np.array([[len(s), len(t)] for s, t in zip(src, tgt, strict=True)])
    spec = batching.BlockSpec(np.arange(2), np.zeros(2, np.int64), sizes, None, 1,
                              layout.feature_lengths)
    starts = np.array([0, len(src[0])]), np.array([0, len(tgt[0])])
    row = batching.gather({"inputs": (np.concatenate(src), starts[0]),
                           "targets": (np.concatenate(tgt), starts[1])}, sizes, spec, layout)
    packed = loss({k: jnp.asarray(v) for k, v in row.items()})
    assert float(packed["weight"]) == 7
    assert float(packed["loss"]) == pytest.approx(
        float(padded[0]["loss"] + padded[1]["loss"]), rel=1e-5
    )


def test_resuming_with_changed_data_settings_is_reported(tiny_config, tmp_path):
    workdir = str(tmp_path)
    run_config.save_config_json(tiny_config, workdir)
    assert run_config.warn_on_changed_data(tiny_config, workdir) == []
    tiny_config.data.batch_size = 32
    tiny_config.train.num_steps = 99  # not a data field: resuming longer is the point
    assert run_config.warn_on_changed_data(tiny_config, workdir) == ["data.batch_size"]


def test_a_workdir_from_before_attention_bias_decodes_and_asks_for_it_on_resume(
    tiny_config, tmp_path
):
    """Checkpoints written before model.attention_bias existed have biased projections and
    configs without the key: decode builds their model, resuming names the setting to pass."""
    from t2t_jax.decode import load_decoder

    workdir = str(tmp_path)
    tiny_config.model.attention_bias = True
    tiny_config.train.update(num_steps=2, checkpoint_every=2, eval_every=2)
    train_and_evaluate(tiny_config, workdir)
    params = checkpoint.restore_host_state(workdir)[0]["params"]
    assert params["encoder"]["layer_0"]["self_attention"]["query"]["bias"].shape == (4, 8)
    saved_configs = [os.path.join(workdir, run_config.CONFIG_FILENAME),
                     os.path.join(checkpoint.checkpoint_dir(workdir), "2", "config", "metadata")]
    for path in saved_configs:  # as an older t2t_jax wrote them
        with open(path) as f:
            saved = json.load(f)
        del saved["model"]["attention_bias"]
        with open(path, "w") as f:
            json.dump(saved, f)

    decoder = load_decoder(workdir)
    assert decoder.model.config.attention_bias
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(decoder.params[0]), params)

    tiny_config.model.attention_bias = False  # the default now
    tiny_config.train.num_steps = 4
    with open(saved_configs[0]) as f:
        before = f.read()
    with pytest.raises(ValueError, match=r"resume with --config.model.attention_bias=True,"):
        train_and_evaluate(tiny_config, workdir)
    with open(saved_configs[0]) as f:
        assert f.read() == before  # the run's own record kept
    tiny_config.model.attention_bias = True  # as the error says
    assert train_and_evaluate(tiny_config, workdir)["step"] == 4
    # `t2t-jax experiment` reruns resume such a workdir with its run's layout by themselves.
    from t2t_jax.guide.runs import train_variant

    tiny_config.model.attention_bias = False
    tiny_config.train.num_steps = 6
    assert train_variant(tiny_config, workdir)["curve"][-1][0] == 6
    assert tiny_config.model.attention_bias
    # Clipping adds a part to the optimizer state: Orbax would only say the trees differ.
    tiny_config.train.update(num_steps=8, grad_clip_norm=1.0)
    with pytest.raises(ValueError, match=r"resume with --config.train.grad_clip_norm=0.0,"):
        train_and_evaluate(tiny_config, workdir)


def test_scanned_layers_train_sharded_and_decode_unrolled(tiny_config, tmp_path):
    from t2t_jax.decode import DecodeOptions, Search, best_texts, load_decoder, translate

    tiny_config.model.scan_layers = True
    tiny_config.model.num_encoder_layers = tiny_config.model.num_decoder_layers = 2
    tiny_config.mesh.ici.update(dict(data=2, fsdp=2, tensor=2))
    result = train_and_evaluate(tiny_config, str(tmp_path))
    params = checkpoint.restore_host_state(str(tmp_path))[0]["params"]
    assert params["encoder"]["layers"]["layer"]["ffn"]["wi"]["kernel"].shape == (2, 32, 64)
    decoder = load_decoder(str(tmp_path))
    assert not decoder.model.config.scan_layers and "layer_1" in decoder.params[0]["decoder"]
    sources = [source for source, _, _ in result["samples"]]
    # The training loop's length cap, which a barely trained model that never ends may reach.
    options = DecodeOptions(Search(beam_size=1),
                            max_output_length=tiny_config.data.max_target_length)
    outputs = best_texts(translate(decoder, sources, options)[0])
    # The training loop's greedy samples (scanned params, unstacked) match the CLI's decoder.
    assert outputs == [output for _, _, output in result["samples"]]


def test_progress_lines_give_step_loss_speed_wait_and_eta():
    from t2t_jax.metrics import ProgressLines

    row = {"loss": 1.23456, "accuracy": 0.5, "tokens_per_s": 12345.6, "step_time_s": 0.5,
           "input_wait_s": 0.01}
    assert ProgressLines(1500, True).line(300, row) == (
        "step 300/1500: loss 1.2346, accuracy 0.5000, 12,346 tokens/s, input wait 2.0%, "
        "ETA 10m 00s")
    assert ProgressLines(100_000, True).line(0, row).endswith("ETA 13h 53m")
