"""Export to CTranslate2: its teacher-forced log-probs equal ours on every exportable variant,
its greedy output is ours on a trained model's whole validation split, its re-ranked beam agrees
with ours, and what it cannot hold is a one-line error."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from t2t_jax.data.tokenizer import EOS_ID, SymbolTokenizer
from t2t_jax.decode import DecodeOptions, Search, load_decoder, translate
from t2t_jax.export.ctranslate2_spec import export_ctranslate2
from t2t_jax.model import ModelConfig, build_model
from t2t_jax.model.models import NotSupported

ctranslate2 = pytest.importorskip("ctranslate2")

TOKENIZER = SymbolTokenizer([str(i) for i in range(10)])
SMALL = dict(vocab_size=16, num_encoder_layers=2, num_decoder_layers=2, d_model=16, d_ff=32,
             num_heads=4, dropout_rate=0.0, max_positions=32)
VARIANTS = {  # the paper's model, and each way an exportable model departs from it
    "paper": {},
    "pre_ln_biases_learned_untied": dict(norm="pre", attention_bias=True, positional="learned",
                                         share_embeddings=False),
    "no_positions_unscaled_biases": dict(positional="none", scale_attention=False,
                                         attention_bias=True),
    "pre_ln_untied_epsilon": dict(norm="pre", share_embeddings=False, layer_norm_epsilon=1e-3),
}


def random_model(**changes):
    config = ModelConfig(**SMALL, **changes)
    model = build_model(config)
    ones = jnp.ones((1, 4), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(1), inputs=ones, targets=ones)["params"])
    # Non-trivial norms and biases, so that a parameter exported to the wrong place shows.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys, strict=True)])
    return config, model, params


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ctranslate2_log_probs_equal_ours_on_every_exportable_variant(variant, tmp_path):
    config, model, params = random_model(**VARIANTS[variant])
    out = export_ctranslate2(config, params, TOKENIZER, str(tmp_path / "ct2"),
                             {"max_source_length": 12})
    translator = ctranslate2.Translator(out, device="cpu")
    rng = np.random.default_rng(0)
    sources = [list(rng.integers(3, 13, n)) for n in (3, 7, 11)]
    targets = [list(rng.integers(3, 13, n)) for n in (5, 2, 9)]
    pieces = TOKENIZER.pieces()
    scored = translator.score_batch([[pieces[i] for i in s] for s in sources],
                                    [[pieces[i] for i in t] for t in targets])
    # Ours, in one padded batch: padding is masked in the source and comes after the target.
    inputs, outputs = np.zeros((3, 12), np.int32), np.zeros((3, 10), np.int32)
    for row, (source, target) in enumerate(zip(sources, targets, strict=True)):
        inputs[row, : len(source) + 1] = source + [EOS_ID]
        outputs[row, : len(target) + 1] = target + [EOS_ID]
    log_probs = jax.nn.log_softmax(model.apply({"params": params}, inputs, outputs))
    ours = np.take_along_axis(np.asarray(log_probs), outputs[..., None], axis=-1)[..., 0]
    for row, (target, result) in enumerate(zip(targets, scored, strict=True)):
        np.testing.assert_allclose(result.log_probs, ours[row, : len(target) + 1], atol=1e-4)


def test_what_ctranslate2_cannot_hold_is_a_one_line_error(tmp_path):
    for changes, message in [(dict(type="lstm_seq2seq"), "not supported for lstm_seq2seq"),
                             (dict(residual=False), "model.residual=False cannot be exported"),
                             (dict(type="decoder_only"), "decoder_only is not supported yet")]:
        with pytest.raises(NotSupported, match=message):
            export_ctranslate2(ModelConfig(**SMALL, **changes), {}, TOKENIZER,
                               str(tmp_path / "x"), {"max_source_length": 8})
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.xdist_group("reverse_model")
def test_ctranslate2_decodes_a_trained_model_as_we_do(reverse_workdir, tmp_path):
    from t2t_jax.export.ctranslate2_engine import CTranslate2Engine
    from tests.test_cli import t2t_jax
    from tests.test_decode import validation_pairs

    float32, int8 = str(tmp_path / "float32"), str(tmp_path / "int8")
    done = t2t_jax("export", "--workdir", reverse_workdir, "--output", int8, "--quantization",
                   "int8")
    assert done.returncode == 0 and "exported step 1500 (int8)" in done.stdout, done.stderr
    decoder = load_decoder(reverse_workdir)
    settings = {"max_source_length": decoder.max_source_length, "step": decoder.step}
    params = jax.device_get(decoder.params[0])
    export_ctranslate2(decoder.model.config, params, decoder.tokenizer, float32, settings)
    with pytest.raises(ValueError, match="exists; pass --force"):
        export_ctranslate2(decoder.model.config, params, decoder.tokenizer, float32, settings)
    sources, references = validation_pairs(decoder, -1)
    engine = CTranslate2Engine(float32, (1, 4), 64)
    greedy_ours, _ = translate(decoder, sources, DecodeOptions(Search(beam_size=1)))
    greedy_ct2 = engine.translate(engine.encode(sources, None), 1, 0.6)
    assert [h[0].text for h in greedy_ct2] == [h[0].text for h in greedy_ours]
    np.testing.assert_allclose([h[0].log_prob for h in greedy_ct2],
                               [h[0].log_prob for h in greedy_ours], atol=1e-4)
    beam_ours, _ = translate(decoder, sources[:64], DecodeOptions(Search(4, 0.6)))
    beam_ct2 = engine.translate(engine.encode(sources[:64], None), 4, 0.6)
    agree = np.mean([a[0].text == b[0].text for a, b in zip(beam_ours, beam_ct2, strict=True)])
    assert agree >= 0.95
    int8_engine = CTranslate2Engine(int8, (1,), 64)
    assert int8_engine.translator.compute_type.startswith("int8")
    greedy_int8 = int8_engine.translate(int8_engine.encode(sources, None), 1, 0.6)
    exact = np.mean([h[0].text == r for h, r in zip(greedy_int8, references, strict=True)])
    assert exact >= 0.95  # the reversal survives 8-bit weights
    size = {q: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
            for q, d in (("float32", float32), ("int8", int8))}
    assert size["int8"] < 0.6 * size["float32"]
