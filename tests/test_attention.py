"""Attention kernels against the einsum reference: structured masks, flash memory, splash."""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from t2t_jax import sharding
from t2t_jax.model import ModelConfig, build_model, kernels
from t2t_jax.model.masks import AttentionMask, segment_spans
from t2t_jax.model.splash import splash_attention

TINY = dict(
    vocab_size=20, num_encoder_layers=2, num_decoder_layers=2, d_model=32, d_ff=64,
    num_heads=4, dropout_rate=0.0,
)


def interpreted_splash(query, key, value, mask):
    """The TPU kernel run by the Pallas interpreter, which works on CPU."""
    return splash_attention(query, key, value, mask, interpret=True)


def qkv(q_len, k_len, seed=0, batch=2, heads=2, depth=8):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(keys[0], (batch, q_len, heads, depth)),
        jax.random.normal(keys[1], (batch, k_len, heads, depth)),
        jax.random.normal(keys[2], (batch, k_len, heads, depth)),
    )


def masks(q_len, k_len, causal, packed):
    """Row 0 full, row 1 padded; packed rows hold two examples each."""
    def tokens_and_segments(length):
        tokens = np.ones((2, length), np.int32)
        tokens[1, length - length // 4:] = 0
        segments = np.where(np.arange(length) < length // 2, 1, 2)[None].repeat(2, 0) * tokens
        return jnp.asarray(tokens), jnp.asarray(segments)

    q_tokens, q_segments = tokens_and_segments(q_len)
    k_tokens, k_segments = tokens_and_segments(k_len)
    if not packed:
        q_segments = k_segments = None
    return AttentionMask.from_tokens(q_tokens, k_tokens, q_segments, k_segments, causal=causal)


def test_dense_mask_is_padding_and_segments_and_causality():
    tokens = jnp.array([[5, 6, 7, 8, 0]])
    segments = jnp.array([[1, 1, 2, 2, 0]])
    dense = AttentionMask.from_tokens(tokens, tokens, segments, segments, causal=True).dense()
    expected = np.array([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0],
    ], bool)
    np.testing.assert_array_equal(dense[0, 0], expected)
    unpacked = AttentionMask.from_tokens(tokens, tokens)
    assert not unpacked.packed and not unpacked.causal
    np.testing.assert_array_equal(unpacked.lengths()[0], [4])
    np.testing.assert_array_equal(unpacked.dense()[0, 0], np.outer([1, 1, 1, 1, 0], [1] * 4 + [0]))


KERNELS = {
    "dot_product_attention": kernels.fused_attention,
    "blockwise": lambda q, k, v, m: kernels.flash_attention(q, k, v, m, block=16),
    "splash_interpreted": interpreted_splash,
}
SHAPES = {"self": (40, 40, False), "causal": (40, 40, True), "cross": (30, 50, False)}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernels_match_the_einsum_reference_forward_and_backward(kernel, shape, packed):
    q_len, k_len, causal = SHAPES[shape]
    query, key, value = qkv(q_len, k_len)
    mask = masks(q_len, k_len, causal, packed)
    real = np.asarray(mask.query_segments > 0)  # padding queries' outputs are never used
    cotangent = jax.random.normal(jax.random.key(9), query.shape) * real[..., None, None]

    def loss(fn, *qkv_):
        return jnp.sum(fn(*qkv_, mask) * cotangent)

    expected = kernels.xla_attention(query, key, value, mask)
    out = jax.jit(lambda *a: KERNELS[kernel](*a, mask))(query, key, value)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(expected)[real], atol=2e-5)
    grads = jax.jit(jax.grad(lambda *a: loss(KERNELS[kernel], *a), (0, 1, 2)))(query, key, value)
    expected_grads = jax.grad(lambda *a: loss(kernels.xla_attention, *a), (0, 1, 2))(
        query, key, value
    )
    for name, got, want in zip("qkv", grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=5e-5, err_msg=f"d{name}")


def _temp_bytes(kernel, length):
    """XLA's temporary memory for the gradient of causal self-attention at `length`."""
    x = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(q, k, v, t):
        return kernel(q, k, v, AttentionMask.from_tokens(t, t, causal=True)).sum()

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_training_memory_grows_linearly_with_length():
    blockwise = [_temp_bytes(kernels.blockwise_attention, n) for n in (1024, 4096)]
    einsum = [_temp_bytes(kernels.xla_attention, n) for n in (1024, 4096)]
    # 4x the length: ~4x the memory for the flash kernel, ~16x for materialised weights.
    assert blockwise[1] / blockwise[0] < 5, blockwise
    assert einsum[1] / einsum[0] > 9, einsum
    assert blockwise[1] < einsum[1] / 4


def test_cudnn_gets_lengths_and_a_causal_flag_not_a_dense_mask(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(kw))
    query, key, value = qkv(6, 6)
    kernels._jax_dot_product_attention(query, key, value, masks(6, 6, True, False), "cudnn")
    assert "mask" not in calls[0]
    assert calls[0]["is_causal"] and calls[0]["implementation"] == "cudnn"
    np.testing.assert_array_equal(calls[0]["query_seq_lengths"], [6, 5])
    kernels._jax_dot_product_attention(query, key, value, masks(6, 6, True, True), "cudnn")
    assert calls[1]["mask"].shape == (2, 1, 6, 6)  # packed rows: the segment mask, densely
    # Spans asked for where cuDNN cannot take them (no cuDNN here): the dense mask again.
    assert "cuDNN" in kernels.cudnn_spans_unsupported()
    spans_mask = masks(6, 6, True, True).replace(max_segments=2)
    kernels._jax_dot_product_attention(query, key, value, spans_mask, "cudnn")
    assert calls[2]["mask"].shape == (2, 1, 6, 6)


def test_segment_spans_give_each_packed_example_its_offset_and_length():
    segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    lengths, offsets = segment_spans(segments, 4)
    np.testing.assert_array_equal(lengths, [[3, 2, 1, -1], [5, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]])


def span_mask(query_spans, key_spans, q_len, k_len, causal):
    """The mask cuDNN's packed layout applies, as its documentation states it: query example k
    (offsets[k] .. offsets[k] + lengths[k]) attends to key example k, causally within it."""
    (q_lengths, q_offsets), (k_lengths, k_offsets) = (
        (np.asarray(a), np.asarray(b)) for a, b in (query_spans, key_spans))
    allowed = np.zeros((q_lengths.shape[0], 1, q_len, k_len), bool)
    for row, example in np.argwhere(q_lengths > 0):
        q0, k0 = q_offsets[row, example], k_offsets[row, example]
        for i in range(q_lengths[row, example]):
            for j in range(k_lengths[row, example]):
                allowed[row, 0, q0 + i, k0 + j] = not causal or j <= i
    return allowed


@pytest.mark.parametrize("causal", [False, True], ids=["cross", "causal"])
def test_spans_describe_the_same_mask_as_the_segment_ids(causal):
    rng = np.random.default_rng(0)

    def packed_rows(lengths_per_row, row_length):
        rows = np.zeros((len(lengths_per_row), row_length), np.int32)
        for r, lengths in enumerate(lengths_per_row):
            rows[r, :sum(lengths)] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
        return jnp.asarray(rows)

    source = [list(rng.integers(1, 5, size=n)) for n in (3, 1, 4)]
    # Causal self-attention: the same examples on both sides; cross: other lengths per example.
    target = source if causal else [list(rng.integers(1, 4, size=len(r))) for r in source]
    q_segments, k_segments = packed_rows(target, 14), packed_rows(source, 16)
    if causal:
        k_segments = q_segments
    mask = AttentionMask.from_tokens(q_segments, k_segments, q_segments, k_segments,
                                     causal=causal, max_segments=5)
    rebuilt = span_mask(segment_spans(mask.query_segments, 5),
                        segment_spans(mask.key_segments, 5),
                        q_segments.shape[1], k_segments.shape[1], causal)
    np.testing.assert_array_equal(rebuilt, mask.dense())


def fake_packed_cudnn(query, key, value, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale,
                      mask_type):
    """cuDNN's packed attention as its documentation states it, in plain JAX, leaving NaN at
    every position outside the spans, forward and backward, as a kernel that never writes
    there may."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType

    def members(lengths, offsets, length):  # [batch, M, length]: position in example m
        position = jnp.arange(length)[None, None]
        return ((position >= offsets[:, :-1, None])
                & (position < offsets[:, :-1, None] + lengths[:, :, None])
                & (lengths[:, :, None] > 0))

    in_query = members(q_seqlen, q_offsets, query.shape[1])
    in_key = members(kv_seqlen, kv_offsets, key.shape[1])
    allowed = in_query[:, :, :, None] & in_key[:, :, None, :]  # [batch, M, q, k]
    if mask_type == MaskType.PADDING_CAUSAL:
        q_in_example = jnp.arange(query.shape[1])[None, None, :] - q_offsets[:, :-1, None]
        k_in_example = jnp.arange(key.shape[1])[None, None, :] - kv_offsets[:, :-1, None]
        allowed &= q_in_example[:, :, :, None] >= k_in_example[:, :, None, :]
    allowed = jnp.any(allowed, axis=1)[:, None]  # [batch, 1, q, k]
    outside_queries = ~jnp.any(in_query, axis=1)[:, :, None, None]
    outside_keys = ~jnp.any(in_key, axis=1)[:, :, None, None]

    def attend(q, k, v):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
        weights = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", jnp.nan_to_num(weights), v)

    @jax.custom_vjp
    def kernel(q, k, v):
        return jnp.where(outside_queries, jnp.nan, attend(q, k, v))

    def forward(q, k, v):
        return kernel(q, k, v), (q, k, v)

    def backward(inputs, cotangent):
        dq, dk, dv = jax.vjp(attend, *inputs)[1](cotangent)
        return (jnp.where(outside_queries, jnp.nan, dq), jnp.where(outside_keys, jnp.nan, dk),
                jnp.where(outside_keys, jnp.nan, dv))

    kernel.defvjp(forward, backward)
    return kernel(query, key, value)


@pytest.mark.parametrize("causal", [False, True], ids=["cross", "causal"])
def test_cudnn_spans_path_computes_the_segment_mask_attention(causal, monkeypatch):
    """The span path's wiring (which spans go where, scale, mask type, the cut at padding) with
    cuDNN's documented semantics in its place: the einsum reference's outputs and gradients,
    and nothing of the kernel's garbage at padding."""
    cudnn_fmha = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    monkeypatch.setattr(cudnn_fmha, "dot_product_attention", fake_packed_cudnn)
    q_len = 12 if causal else 8
    query, key, value = qkv(q_len, 12, heads=2, depth=8)
    q_segments = jnp.array([[1] * 5 + [2] * 4 + [3] * 3, [1] * 7 + [2] * 3 + [0] * 2])[:, :q_len]
    k_segments = q_segments if causal else jnp.array(
        [[1] * 3 + [2] * 6 + [3] * 3, [1] * 2 + [2] * 8 + [0] * 2])
    if not causal:
        q_segments = jnp.array([[1] * 2 + [2] * 3 + [3] * 3, [1] * 4 + [2] * 2 + [0] * 2])
    mask = AttentionMask.from_tokens(q_segments, k_segments, q_segments, k_segments,
                                     causal=causal, max_segments=4)
    cotangent = jax.random.normal(jax.random.key(9), query.shape)

    def results(kernel):
        out, pullback = jax.vjp(lambda q, k, v: kernel(q, k, v, mask), query, key, value)
        return out, pullback(cotangent * (q_segments > 0)[:, :, None, None])

    got, want = results(kernels.cudnn_packed_attention), results(kernels.xla_attention)
    real = (q_segments > 0)[:, :, None, None]
    np.testing.assert_allclose(jnp.where(real, got[0], 0), jnp.where(real, want[0], 0), atol=1e-5)
    assert jnp.all(jnp.isfinite(got[0])) and all(jnp.all(jnp.isfinite(g)) for g in got[1])
    for got_grad, want_grad in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(got_grad, want_grad, atol=1e-5)


def test_cudnn_takes_packed_rows_as_spans_with_no_dense_mask(monkeypatch):
    """Lowered for CUDA on this CPU machine (cuDNN's presence and the GPU's generation, which the
    lowering asks about, stubbed): the fused kernel gets each example's span forward and
    backward, and the program holds no [q_len, k_len] mask. Whether cuDNN computes the right
    numbers is `t2t-jax check-attention`'s question, on a GPU."""
    cudnn_fmha = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    for name in ("check_cudnn_version", "check_compute_capability",
                 "is_cuda_compute_capability_equal"):
        if not hasattr(cudnn_fmha, name):
            pytest.skip(f"JAX's cuDNN module has no {name} to stub")
    monkeypatch.setattr(cudnn_fmha, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn_fmha, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn_fmha, "is_cuda_compute_capability_equal", lambda c: False)
    monkeypatch.setattr(kernels, "current_platform", lambda: "gpu")
    monkeypatch.setattr(kernels, "cudnn_spans_unsupported", lambda: None)
    length, max_segments = 32, 3
    tokens = jnp.ones((2, length), jnp.int32)
    segments = jnp.asarray(np.repeat([[1, 2, 3, 0]], length // 4, axis=1))
    mask = AttentionMask.from_tokens(tokens, tokens, segments, segments, causal=True,
                                     max_segments=max_segments)
    query, key, value = (x.astype(jnp.bfloat16) for x in qkv(length, length, depth=64))

    def loss(query, key, value):
        return jnp.sum(kernels.cudnn_attention(query, key, value, mask).astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(query, key, value).lower(
        lowering_platforms=("cuda",))
    text = lowered.as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call @__cudnn$fmha" in line]
    forward = [c for c in calls if "fmhaSoftmax(" in c]
    backward = [c for c in calls if "fmhaSoftmaxBackward(" in c]
    assert len(forward) == len(backward) == 1
    # q, k, v, then lengths and offsets for each side ([2, 3] and [2, 4] int32 before cuDNN's
    # flattening); the dense path would pass a [2, 1, 32, 32] bias instead.
    assert forward[0].count("%") - forward[0].split("=")[0].count("%") == 7
    assert f"{length}x{length}x" not in text


def test_splash_falls_back_to_the_einsum_path_off_tpu(caplog):
    query, key, value = qkv(8, 8)
    mask = masks(8, 8, True, False)
    with caplog.at_level(logging.WARNING):
        out = kernels.splash_tpu_attention(query, key, value, mask)
    np.testing.assert_array_equal(out, kernels.xla_attention(query, key, value, mask))
    assert "splash kernel is for TPU, this is cpu" in caplog.text
    assert kernels.splash_unsupported(query, mask, "tpu") is None
    assert "incremental decoding" in kernels.splash_unsupported(query[:, :1], mask, "tpu")
    assert "dense mask" in kernels.splash_unsupported(query, mask.dense(), "tpu")


def _logits_and_grads(config, params, batch):
    model = build_model(config)

    def loss(p):
        logits = model.apply({"params": p}, **batch)
        # Padding positions' outputs differ between kernels and never reach a real loss.
        return jnp.mean(logits**2 * (batch["targets"] > 0)[..., None]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.mark.parametrize("implementation", ["blockwise", "splash"])
def test_model_on_a_mesh_matches_the_einsum_path(implementation, monkeypatch):
    """Packed and padded rows through the whole model on 8 devices (data 2, fsdp 2, tensor 2):
    the splash kernel runs per shard under shard_map (interpreted on CPU)."""
    monkeypatch.setitem(kernels.KERNELS, "splash", interpreted_splash)
    tokens = jax.random.randint(jax.random.key(1), (4, 24), 3, 20).at[1, 20:].set(0)
    segments = jnp.where(jnp.arange(24) < 10, 1, 2)[None].repeat(4, 0) * (tokens > 0)
    positions = jnp.where(jnp.arange(24) < 10, jnp.arange(24), jnp.arange(24) - 10)[None]
    batch = dict(
        inputs=tokens, targets=tokens, inputs_segmentation=segments,
        targets_segmentation=segments, inputs_positions=positions.repeat(4, 0),
        targets_positions=positions.repeat(4, 0),
    )
    one_layer = TINY | dict(num_encoder_layers=1, num_decoder_layers=1)  # every attention kind
    reference = ModelConfig(**one_layer, attention="xla")
    params = nn.meta.unbox(build_model(reference).init(jax.random.key(0), tokens, tokens))
    params = params["params"]
    mesh = sharding.make_mesh(ml_collections.ConfigDict(
        {"ici": {"data": 2, "fsdp": 2, "tensor": 2}, "dcn": {"data": 1, "fsdp": 1, "tensor": 1}}
    ))
    with sharding.activate(mesh):
        expected = _logits_and_grads(reference, params, batch)
        got = _logits_and_grads(ModelConfig(**one_layer, attention=implementation), params, batch)
    real = np.asarray(tokens > 0)
    np.testing.assert_allclose(np.asarray(got[0])[real], np.asarray(expected[0])[real], atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), got[1], expected[1])


def test_check_attention_reports_small_errors_and_names_fallbacks():
    from t2t_jax.perf import kernel_check

    checks = kernel_check.check_kernels(["blockwise"], "float32", length=16)
    assert {(c.case, c.rows) for c in checks} == {
        (case, rows) for case in ("self", "causal", "cross") for rows in ("padded", "packed")
    }
    assert all(c.output_error < 1e-5 and c.gradient_error < 1e-5 and not c.fallback for c in checks)
    # No GPU here: the einsum path ran in cuDNN's place, and the check says so.
    checks.append(kernel_check.check_kernel("cudnn", "causal", "spans", "float32", length=16))
    assert checks[-1].output_error < 1e-6 and "needs an NVIDIA GPU" in checks[-1].fallback
    lines = kernel_check.format_checks(checks)
    assert len(lines) == 1 + len(checks) and "fell back" in lines[-1]


def test_cpu_auto_uses_einsum_for_short_keys_and_blockwise_from_256():
    for length, blockwise in ((255, False), (256, True)):
        q, k, v = qkv(4, length, batch=1, heads=1, depth=4)
        ones = jnp.ones((1, 4), jnp.int32), jnp.ones((1, length), jnp.int32)
        mask = AttentionMask.from_tokens(*ones)
        program = str(jax.make_jaxpr(kernels.xla_or_blockwise_attention)(q, k, v, mask))
        assert ("custom_vjp_call" in program and "scan" in program) is blockwise
        reference = kernels.blockwise_attention if blockwise else kernels.xla_attention
        np.testing.assert_array_equal(
            kernels.xla_or_blockwise_attention(q, k, v, mask), reference(q, k, v, mask)
        )
        reason = kernels.fallback_reason("xla_or_blockwise", q, k, mask, "cpu")
        assert (reason is None) is blockwise
    assert kernels.select_attention("auto", "cpu", "float32")[0] == "xla_or_blockwise"
