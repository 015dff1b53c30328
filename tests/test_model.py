"""The model: sizes of the paper's configs, positional encoding, masks, attention kernels."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from t2t_jax.model import (
    ModelConfig,
    build_model,
    kernels,
    shift_right,
    unrolled_for_decoding,
)
from t2t_jax.model.embedding import sinusoidal_encoding, vocab_logits
from t2t_jax.model.kernels import xla_attention
from t2t_jax.model.masks import AttentionMask
from t2t_jax.model.scan import unstack_layers

TINY = dict(
    vocab_size=20, num_encoder_layers=2, num_decoder_layers=2, d_model=32, d_ff=64,
    num_heads=4, dropout_rate=0.0,
)


def count_params(config: ModelConfig) -> int:
    model = build_model(config)
    x = jnp.ones((1, 4), jnp.int32)
    kwargs = {"targets": x} if config.type == "decoder_only" else {"inputs": x, "targets": x}
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **kwargs))
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nn.meta.unbox(shapes)))


def init(config: ModelConfig, src_len=7, tgt_len=6, seed=0):
    model = build_model(config)
    targets = jnp.ones((2, tgt_len), jnp.int32)
    inputs = {} if config.type == "decoder_only" else {"inputs": jnp.ones((2, src_len), jnp.int32)}
    params = model.init(jax.random.key(seed), **inputs, targets=targets)["params"]
    return model, nn.meta.unbox(params)


def random_tokens(seed, shape, vocab=20):
    return jax.random.randint(jax.random.key(seed), shape, 3, vocab)


@pytest.mark.parametrize(
    "overrides, paper, expected",
    [
        ({}, 65e6, 63_045_632),
        (dict(d_model=1024, d_ff=4096, num_heads=16, dropout_rate=0.3), 213e6, 214_171_648),
    ],
)
def test_paper_configs_match_table_3(overrides, paper, expected):
    count = count_params(ModelConfig(vocab_size=37_000, **overrides))
    assert count == expected
    assert abs(count - paper) / paper < 0.05


def test_config_files_build_the_paper_sizes():
    import importlib.util

    for path, expected in [("configs/base.py", 63_045_632), ("configs/big.py", 214_171_648)]:
        spec = importlib.util.spec_from_file_location("cfg", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        assert count_params(ModelConfig.from_config(config.model, 100)) == expected


def test_untied_embeddings_add_two_vocab_matrices():
    tied = count_params(ModelConfig(**TINY))
    untied = count_params(ModelConfig(**TINY, share_embeddings=False))
    assert untied - tied == 2 * 20 * 32


def test_attention_projections_are_matrices_unless_biases_are_asked_for():
    """Section 3.2.2: W^Q, W^K, W^V and W^O are parameter matrices; model.attention_bias adds
    a bias to each (the layout of checkpoints written before it existed)."""
    _, params = init(ModelConfig(**TINY))
    attention = params["decoder"]["layer_0"]["cross_attention"]
    assert all(set(attention[name]) == {"kernel"} for name in ("query", "key", "value", "out"))
    _, biased = init(ModelConfig(**TINY, attention_bias=True))
    attention = biased["decoder"]["layer_0"]["cross_attention"]
    assert attention["query"]["bias"].shape == (4, 8) and attention["out"]["bias"].shape == (32,)
    layers = 2 + 2 * 2  # self-attention in each layer, cross-attention in the decoder's
    assert count_params(ModelConfig(**TINY, attention_bias=True)) - count_params(
        ModelConfig(**TINY)) == layers * 4 * 32


def test_pre_ln_adds_a_final_norm_per_stack():
    post = count_params(ModelConfig(**TINY))
    pre = count_params(ModelConfig(**TINY, norm="pre"))
    assert pre - post == 2 * 2 * 32


def test_sinusoidal_encoding_is_the_papers_formula():
    d_model = 16
    pe = np.asarray(sinusoidal_encoding(jnp.arange(50)[None], d_model))[0]
    for pos in (0, 1, 7, 49):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert pe[pos, 2 * i] == pytest.approx(np.sin(angle), abs=1e-5)
            assert pe[pos, 2 * i + 1] == pytest.approx(np.cos(angle), abs=1e-5)


def test_shift_right_restarts_each_packed_example():
    targets = jnp.array([[5, 6, 7, 8, 9, 0]])
    segments = jnp.array([[1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(shift_right(targets), [[0, 5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(shift_right(targets, segments), [[0, 5, 0, 7, 8, 0]])


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_padding_does_not_change_outputs(norm):
    model, params = init(ModelConfig(**TINY, norm=norm))
    inputs, targets = random_tokens(1, (2, 5)), random_tokens(2, (2, 4))
    logits = model.apply({"params": params}, inputs, targets)
    padded = model.apply(
        {"params": params}, jnp.pad(inputs, ((0, 0), (0, 3))), jnp.pad(targets, ((0, 0), (0, 2)))
    )
    np.testing.assert_allclose(padded[:, :4], logits, atol=1e-5)


def test_decoder_cannot_see_later_positions():
    model, params = init(ModelConfig(**TINY))
    inputs, targets = random_tokens(1, (2, 5)), random_tokens(2, (2, 6))
    changed = targets.at[:, 3:].set(random_tokens(3, (2, 3)))
    a = model.apply({"params": params}, inputs, targets)
    b = model.apply({"params": params}, inputs, changed)
    # Logits at position i depend on targets < i only (inputs are shifted right).
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not np.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("model_type", ["encoder_decoder", "decoder_only"])
def test_packed_rows_give_the_same_logits_as_separate_rows(model_type):
    config = ModelConfig(**TINY, type=model_type)
    model = build_model(config)
    src = [random_tokens(1, (3,)), random_tokens(2, (4,))]
    tgt = [random_tokens(3, (2,)), random_tokens(4, (3,))]

    def run(**kw):
        if model_type == "decoder_only":
            kw = {k: v for k, v in kw.items() if k.startswith("targets")}
        return model.apply({"params": params}, **kw)

    dummy = jnp.ones((1, 7), jnp.int32)
    params = nn.meta.unbox(
        model.init(jax.random.key(0), **({"targets": dummy} if model_type == "decoder_only"
                                         else {"inputs": dummy, "targets": dummy}))["params"]
    )
    packed = run(
        inputs=jnp.concatenate(src)[None],
        targets=jnp.concatenate(tgt)[None],
        inputs_segmentation=jnp.array([[1, 1, 1, 2, 2, 2, 2]]),
        targets_segmentation=jnp.array([[1, 1, 2, 2, 2]]),
        inputs_positions=jnp.array([[0, 1, 2, 0, 1, 2, 3]]),
        targets_positions=jnp.array([[0, 1, 0, 1, 2]]),
    )
    first = run(inputs=src[0][None], targets=tgt[0][None])
    second = run(inputs=src[1][None], targets=tgt[1][None])
    np.testing.assert_allclose(packed[0, :2], first[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 2:], second[0], atol=1e-5)


def test_attention_implementations_agree():
    config = ModelConfig(**TINY)
    model, params = init(config)
    fused = build_model(ModelConfig(**TINY, attention="dot_product_attention"))
    inputs, targets = random_tokens(1, (2, 7)), random_tokens(2, (2, 6))
    inputs = inputs.at[1, 5:].set(0)
    a = model.apply({"params": params}, inputs, targets)
    b = fused.apply({"params": params}, inputs, targets)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_xla_attention_is_softmax_of_scaled_scores():
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 3, 1, 4)) for i in range(3))
    scores = np.einsum("qd,kd->qk", q[0, :, 0], k[0, :, 0]) / 2.0  # sqrt(d_k) = 2
    weights = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    expected = weights @ np.asarray(v[0, :, 0])
    np.testing.assert_allclose(xla_attention(q, k, v, None)[0, :, 0], expected, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_close_logits():
    model, params = init(ModelConfig(**TINY))
    bf16 = build_model(ModelConfig(**TINY, dtype="bfloat16"))
    bf16_params = nn.meta.unbox(
        bf16.init(jax.random.key(0), jnp.ones((2, 7), jnp.int32), jnp.ones((2, 6), jnp.int32))
    )["params"]
    assert {p.dtype for p in jax.tree.leaves(bf16_params)} == {jnp.dtype("float32")}
    inputs, targets = random_tokens(1, (2, 7)), random_tokens(2, (2, 6))
    a = model.apply({"params": params}, inputs, targets)
    b = bf16.apply({"params": params}, inputs, targets)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=0.1)


def all_equations(jaxpr):
    """The equations of a jaxpr and of every jaxpr inside it (custom_vjp, pjit, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from all_equations(inner)


def test_bf16_output_layer_runs_bf16_matmuls_with_float32_logits_and_gradients():
    y = jax.random.normal(jax.random.key(0), (2, 5, 64)).astype(jnp.bfloat16)
    table = jax.random.normal(jax.random.key(1), (300, 64)) * 0.1
    probe = jax.random.normal(jax.random.key(2), (2, 5, 300))  # a gradient for the logits

    def loss(y, table, dtype):
        return jnp.sum(vocab_logits(y, table, dtype) * probe)

    reference = jnp.einsum("bld,vd->blv", y.astype(jnp.float32), table)
    logits = vocab_logits(y, table, jnp.bfloat16)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference, rtol=2e-2, atol=2e-2)
    grads = jax.grad(loss, argnums=(0, 1))(y, table, jnp.bfloat16)
    exact = jax.grad(loss, argnums=(0, 1))(y.astype(jnp.float32), table, jnp.float32)
    assert (grads[0].dtype, grads[1].dtype) == (jnp.bfloat16, jnp.float32)
    for got, want in zip(grads, exact, strict=True):
        error = jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want)
        assert float(error) < 1e-2
    # Forward and both backward matmuls take bf16 operands and accumulate in float32.
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(
        y, table, jnp.bfloat16
    )
    dots = [e for e in all_equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 3
    for dot in dots:
        assert [v.aval.dtype for v in dot.invars] == [jnp.bfloat16, jnp.bfloat16]
        assert dot.outvars[0].aval.dtype == jnp.float32


def test_dropout_is_active_only_in_training():
    model, params = init(ModelConfig(**{**TINY, "dropout_rate": 0.5}))
    inputs, targets = random_tokens(1, (2, 7)), random_tokens(2, (2, 6))
    det = [model.apply({"params": params}, inputs, targets) for _ in range(2)]
    np.testing.assert_array_equal(det[0], det[1])
    train = [
        model.apply({"params": params}, inputs, targets, deterministic=False,
                    rngs={"dropout": jax.random.key(i)})
        for i in range(2)
    ]
    assert not np.allclose(train[0], train[1])


def test_bad_model_config_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by model.num_heads"):
        ModelConfig(**{**TINY, "num_heads": 5})
    with pytest.raises(ValueError, match="model.attention"):
        ModelConfig(**TINY, attention="flash")
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        ModelConfig.from_config({**TINY, "vocab_size": 5}, 20)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_rematerialisation_keeps_params_loss_and_gradients(remat):
    config = ModelConfig(**TINY)
    model, params = init(config)
    rematted = build_model(ModelConfig(**TINY, remat=remat))
    rematted_params = nn.meta.unbox(rematted.init(
        jax.random.key(0), jnp.ones((2, 7), jnp.int32), jnp.ones((2, 6), jnp.int32)
    )["params"])
    assert jax.tree.structure(rematted_params) == jax.tree.structure(params)
    inputs, targets = random_tokens(1, (2, 7)), random_tokens(2, (2, 6))

    # Jitted: op by op, a rematerialised backward pass takes tens of seconds on a CPU.
    @functools.partial(jax.jit, static_argnums=0)
    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, inputs, targets) ** 2)

    np.testing.assert_allclose(loss(rematted, params), loss(model, params), rtol=1e-6)
    grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    grads, rematted_grads = grad(model, params), grad(rematted, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), rematted_grads, grads)


@pytest.mark.parametrize("model_type", ["encoder_decoder", "decoder_only"])
def test_scanned_layers_compute_what_the_unrolled_layers_do(model_type):
    scanned_config = ModelConfig(**TINY, type=model_type, scan_layers=True, remat="full")
    scanned, stacked = init(scanned_config)
    assert jax.tree.leaves(stacked["decoder"]["layers"])[0].shape[0] == 2  # a layer axis
    config, params = unrolled_for_decoding(scanned_config, stacked)
    assert not config.scan_layers
    model = build_model(config)
    # The unstacked params are exactly what the unrolled model expects.
    assert jax.tree.structure(params) == jax.tree.structure(init(config)[1])
    inputs, targets = random_tokens(1, (2, 7)), random_tokens(2, (2, 6))
    kwargs = {"targets": targets} | ({} if model_type == "decoder_only" else {"inputs": inputs})

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, **kwargs) ** 2)

    np.testing.assert_allclose(loss(scanned, stacked), loss(model, params), rtol=1e-6)
    grads = unstack_layers(jax.grad(lambda p: loss(scanned, p))(stacked))
    expected = jax.grad(lambda p: loss(model, p))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, expected)


@pytest.mark.parametrize(
    "requested, platform, dtype, chosen",
    [
        ("auto", "gpu", "bfloat16", "cudnn"),
        ("auto", "gpu", "float32", "xla"),
        ("auto", "tpu", "bfloat16", "splash"),
        ("auto", "cpu", "float32", "xla_or_blockwise"),
        ("dot_product_attention", "gpu", "bfloat16", "dot_product_attention"),
    ],
)
def test_auto_attention_picks_per_platform_and_dtype(requested, platform, dtype, chosen):
    assert kernels.select_attention(requested, platform, dtype)[0] == chosen


def test_unknown_attention_is_a_clear_error():
    with pytest.raises(ValueError, match="one of auto, xla, dot_product_attention, cudnn"):
        kernels.select_attention("flash", "gpu", "bfloat16")


def test_cudnn_falls_back_to_the_einsum_path_where_it_cannot_run(caplog):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32) for _ in range(3))
    tokens = jnp.array([[1, 1, 1, 0, 0], [1] * 5])
    mask = AttentionMask.from_tokens(tokens, tokens)
    with caplog.at_level("WARNING"):
        out = kernels.cudnn_attention(q, k, v, mask)
    np.testing.assert_allclose(out, kernels.xla_attention(q, k, v, mask), atol=1e-6)
    assert kernels.cudnn_unsupported(q, k, "cpu") == (
        "cuDNN flash attention needs an NVIDIA GPU, this is cpu"
    )
    assert "needs bfloat16" in kernels.cudnn_unsupported(q, k, "gpu")
    assert "d_k a multiple of 8" in kernels.cudnn_unsupported(
        q[..., :6].astype(jnp.bfloat16), k, "gpu"
    )
    assert kernels.cudnn_unsupported(q.astype(jnp.bfloat16), k, "gpu") is None


def test_each_model_type_is_one_class_and_the_lstm_names_what_it_cannot_do():
    from t2t_jax.model.model_config import MODEL_TYPES
    from t2t_jax.model.models import MODEL_CLASSES, NotSupported, model_type

    assert tuple(MODEL_CLASSES) == MODEL_TYPES
    lm = model_type(ModelConfig(**TINY, type="decoder_only"))
    seq2seq = model_type("encoder_decoder")
    assert lm.feature_lengths(3, 5) == {"targets": 8, "loss_mask": 8}
    assert seq2seq.feature_lengths(3, 5) == {"inputs": 3, "targets": 5}
    assert lm.split_length(9) == (4, 5) and seq2seq.split_length(9) == (9, 9)
    assert lm.output_begin(4) == 4 and seq2seq.output_begin(4) == 0
    config = ModelConfig(**TINY, type="lstm_seq2seq")
    lstm = model_type(config)
    assert lstm.feature_lengths(3, 5) == {"inputs": 3, "targets": 5}  # it trains and scores
    module = build_model(config)
    params = module.init(jax.random.key(0), jnp.ones((1, 3), jnp.int32),
                         jnp.ones((1, 3), jnp.int32))["params"]
    for unsupported in (lambda: lstm.start_search(module, params, jnp.ones((1, 3)), 1, 4),
                        lambda: lstm.flops_per_step(1, 8, "train")):
        with pytest.raises(NotSupported, match="is not supported for lstm_seq2seq") as error:
            unsupported()
        assert "\n" not in str(error.value)
