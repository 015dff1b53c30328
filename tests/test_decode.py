"""Greedy decoding: the jitted loop equals step-by-step argmax over the growing prefix."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from t2t_jax.data.tokenizer import EOS_ID, SymbolTokenizer
from t2t_jax.decode import decode_texts, greedy_continue, greedy_translate
from t2t_jax.model import ModelConfig, build_model

TINY = dict(vocab_size=13, num_encoder_layers=1, num_decoder_layers=2, d_model=32, d_ff=64,
            num_heads=4, dropout_rate=0.0)


def init(model_type):
    model = build_model(ModelConfig(**TINY, type=model_type))
    ones = jnp.ones((1, 4), jnp.int32)
    kwargs = {"targets": ones} if model_type == "decoder_only" else {"inputs": ones,
                                                                     "targets": ones}
    return model, nn.meta.unbox(model.init(jax.random.key(0), **kwargs)["params"])


def test_greedy_translate_equals_step_by_step_argmax():
    model, params = init("encoder_decoder")
    inputs = jnp.array([[5, 6, 7, EOS_ID, 0], [8, 9, EOS_ID, 0, 0]])
    out = np.asarray(greedy_translate(model, params, inputs, 6))
    for row in range(2):
        prefix = []
        for _ in range(6):
            # Reference: re-run the model on the prefix plus a placeholder for the next token.
            targets = jnp.array([prefix + [EOS_ID]])
            logits = model.apply({"params": params}, inputs[row : row + 1], targets)[0, -1]
            logits = logits.at[0].set(-jnp.inf)
            prefix.append(int(jnp.argmax(logits)))
        assert out[row].tolist() == prefix


def test_greedy_continue_keeps_the_prompt_and_matches_a_reference():
    model, params = init("decoder_only")
    tokens = jnp.array([[5, 6, EOS_ID, 0, 0, 0, 0], [7, EOS_ID, 0, 0, 0, 0, 0]])
    start = jnp.array([3, 2])
    out = np.asarray(greedy_continue(model, params, tokens, start))
    np.testing.assert_array_equal(out[0, :3], [5, 6, EOS_ID])
    np.testing.assert_array_equal(out[1, :2], [7, EOS_ID])
    prefix = [7, EOS_ID]
    while len(prefix) < 7:
        logits = model.apply({"params": params}, jnp.array([prefix + [EOS_ID]]))[0, -1]
        prefix.append(int(jnp.argmax(logits.at[0].set(-jnp.inf))))
    assert out[1].tolist() == prefix


def test_decode_texts_returns_one_line_per_source_in_order():
    model, params = init("encoder_decoder")
    tokenizer = SymbolTokenizer([str(i) for i in range(10)])
    sources = ["1 2 3", "4", "5 6 7 8 9 0"]
    outputs = decode_texts(model, params, tokenizer, sources, "encoder_decoder", 8, 8)
    assert len(outputs) == 3
    for text in outputs:
        assert all(symbol in tokenizer.symbols for symbol in text.split())
    # A batch of one gives the same output as the same source inside a batch.
    single = decode_texts(model, params, tokenizer, sources[1:2], "encoder_decoder", 8, 8)
    assert single[0] == outputs[1]
