"""`t2t-jax experiment`: each of the paper guide's experiments in smoke mode writes its JSON and
plots, with figures that say what the guide says they show."""

import json
import math
import os

import numpy as np
import pytest

from t2t_jax.guide import experiments


def read(output, name):
    with open(os.path.join(output, f"{name}.json")) as f:
        return json.load(f)


def pngs(output):
    return {n for n in os.listdir(output) if n.endswith(".png") and os.path.getsize(
        os.path.join(output, n)) > 1000}


def finite_runs(results):
    for run in results["runs"].values():
        assert run["curve"] and all(math.isfinite(loss) for _, loss in run["curve"])
        assert 0 <= run["eval_accuracy"] <= 1 and 0 <= run["test_accuracy"] <= 1


def test_softmax_saturates_without_scaling_as_d_k_grows():
    small, large = 4, 1024
    scaled = [experiments.softmax_statistics(d, True) for d in (small, large)]
    unscaled = [experiments.softmax_statistics(d, False) for d in (small, large)]
    # Scaled: the logits keep unit variance, so entropy and gradient do not depend on d_k.
    assert scaled[1]["entropy"] == pytest.approx(scaled[0]["entropy"], rel=0.1)
    assert scaled[1]["entropy"] > 0.8 * math.log(64)
    # Unscaled: one key takes (nearly) all the weight and the gradient all but vanishes.
    assert unscaled[1]["max_weight"] > 0.9 and unscaled[1]["entropy"] < 0.3
    assert unscaled[1]["jacobian_norm"] < 0.5 * scaled[1]["jacobian_norm"]


@pytest.mark.parametrize("name", ["positional", "scaling", "heads", "attention_maps",
                                  "rnn_vs_transformer", "residual_norm", "hparams"])
def test_each_experiment_writes_sane_json_and_plots(name, tmp_path, data_dir):
    output = str(tmp_path)
    results = experiments.run(name, output, smoke=True, data_dir=data_dir)
    assert read(output, name) == json.loads(json.dumps(results))
    expected_plots = {
        "positional": {"positional_encoding.png", "positional_accuracy.png"},
        "scaling": {"scaling_softmax.png", "scaling_training.png"},
        "heads": {"heads_accuracy.png", "heads_training.png"},
        "attention_maps": {"attention_maps.png"},
        "rnn_vs_transformer": {"rnn_vs_transformer.png"},
        "residual_norm": {"residual_norm_training.png", "residual_norm_accuracy.png"},
        "hparams": {"hparams_accuracy.png"},
    }[name]
    assert expected_plots <= pngs(output)
    if name == "positional":
        finite_runs(results)
        assert set(results["runs"]) == {"sinusoidal", "learned", "none"}
        similarity = results["similarity_at_distance_0_1_4_16"]
        assert similarity[0] == pytest.approx(64.0)  # d_model/2 sin^2+cos^2 pairs
        assert similarity == sorted(similarity, reverse=True)
    elif name == "scaling":
        finite_runs(results)
        entropy = [s["entropy"] for s in results["softmax"]["False"]]
        assert entropy == sorted(entropy, reverse=True)  # unscaled: sharper as d_k grows
    elif name == "heads":
        finite_runs(results)
        assert set(results["runs"]) == {"1 heads", "4 heads"}
    elif name == "rnn_vs_transformer":
        finite_runs(results)
        lstm, transformer = results["runs"]["lstm"], results["runs"]["transformer"]
        assert 0.8 < lstm["parameters"] / transformer["parameters"] < 1.25  # a fair match
        for run in (lstm, transformer):  # both trained for the same budget (capped in smoke)
            budget_steps = max(4, int(results["budget_s"] / run["step_time_s"]))
            assert run["steps"] == min(budget_steps, 8)
        assert all(t > 0 for times in results["step_time_s"].values() for t in times)
    elif name == "residual_norm":
        assert set(results["runs"]) == {"post-LN", "no residual"}  # smoke: 2 of the 6
        assert all(run["curve"] for run in results["runs"].values())
    elif name == "hparams":
        finite_runs(results)
        assert len(results["runs"]) == 2
    else:
        assert results["source"][-1] == "</s>" and len(results["source"]) == 9
        assert_attention_maps_are_distributions(os.path.join(output, "runs", "attention_reverse"))
        assert {"encoder/layer_0/self_attention", "decoder/layer_0/self_attention",
                "decoder/layer_0/cross_attention"} == set(results["mean_max_weight"])
        for weights in results["mean_max_weight"].values():
            assert len(weights) == 4 and all(0 < w <= 1 for w in weights)


def test_unknown_experiment_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="choose one of positional, scaling"):
        experiments.run("bogus", str(tmp_path))


def assert_attention_maps_are_distributions(workdir):
    from t2t_jax.decode import load_decoder
    from t2t_jax.guide.experiments import capture_attention

    captured = capture_attention(load_decoder(workdir), "3 1 4")
    assert len(captured["maps"]) == 3
    for name, weights in captured["maps"].items():
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5, err_msg=name)
        if "decoder" in name and "self" in name:  # causal: nothing above the diagonal
            assert np.all(np.triu(weights[0], 1) < 1e-6)


def test_the_lstm_baseline_is_causal_and_shaped_like_the_transformer():
    import jax
    import jax.numpy as jnp

    from t2t_jax.model import ModelConfig, build_model

    config = ModelConfig(vocab_size=13, type="lstm_seq2seq", d_model=16, num_encoder_layers=2,
                         num_decoder_layers=2)
    model = build_model(config)
    inputs = jnp.array([[3, 4, 5, 1, 0, 0]])
    targets = jnp.array([[5, 4, 3, 1, 0]])
    params = model.init(jax.random.key(0), inputs=inputs, targets=targets)["params"]
    logits = model.apply({"params": params}, inputs=inputs, targets=targets)
    assert logits.shape == (1, 5, 13) and logits.dtype == jnp.float32
    changed = model.apply({"params": params}, inputs=inputs, targets=targets.at[0, 3].set(7))
    # Position t sees targets before t only; padding in the source changes nothing.
    np.testing.assert_allclose(changed[0, :4], logits[0, :4], atol=1e-6)
    assert not np.allclose(changed[0, 4], logits[0, 4])
    padded = jnp.array([[3, 4, 5, 1, 0, 0, 0, 0]])
    np.testing.assert_allclose(
        model.apply({"params": params}, inputs=padded, targets=targets), logits, atol=1e-5
    )
