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


def run_smoke(name, tmp_path, data_dir, plots):
    """The experiment in smoke mode: its results, checked to equal its JSON, and its plots."""
    output = str(tmp_path)
    results = experiments.run(name, output, smoke=True, data_dir=data_dir)
    assert read(output, name) == json.loads(json.dumps(results))
    assert plots <= pngs(output)
    return results


def test_positional_encodings_are_compared_and_sinusoids_decay_with_distance(tmp_path, data_dir):
    results = run_smoke("positional", tmp_path, data_dir,
                        {"positional_encoding.png", "positional_accuracy.png"})
    finite_runs(results)
    assert set(results["runs"]) == {"sinusoidal", "learned", "none"}
    similarity = results["similarity_at_distance_0_1_4_16"]
    assert similarity[0] == pytest.approx(64.0)  # d_model/2 sin^2+cos^2 pairs
    assert similarity == sorted(similarity, reverse=True)


def test_unscaled_attention_sharpens_as_d_k_grows(tmp_path, data_dir):
    results = run_smoke("scaling", tmp_path, data_dir,
                        {"scaling_softmax.png", "scaling_training.png"})
    finite_runs(results)
    entropy = [s["entropy"] for s in results["softmax"]["False"]]
    assert entropy == sorted(entropy, reverse=True)


def test_head_counts_train_side_by_side(tmp_path, data_dir):
    results = run_smoke("heads", tmp_path, data_dir, {"heads_accuracy.png", "heads_training.png"})
    finite_runs(results)
    assert set(results["runs"]) == {"1 heads", "4 heads"}


def test_attention_maps_are_distributions_over_each_layers_keys(tmp_path, data_dir):
    results = run_smoke("attention_maps", tmp_path, data_dir, {"attention_maps.png"})
    assert results["source"][-1] == "</s>" and len(results["source"]) == 9
    assert_attention_maps_are_distributions(os.path.join(str(tmp_path), "runs",
                                                         "attention_reverse"))
    assert {"encoder/layer_0/self_attention", "decoder/layer_0/self_attention",
            "decoder/layer_0/cross_attention"} == set(results["mean_max_weight"])
    for weights in results["mean_max_weight"].values():
        assert len(weights) == 4 and all(0 < w <= 1 for w in weights)


def test_the_lstm_and_the_transformer_of_one_size_train_for_one_time_budget(tmp_path, data_dir):
    results = run_smoke("rnn_vs_transformer", tmp_path, data_dir, {"rnn_vs_transformer.png"})
    finite_runs(results)
    lstm, transformer = results["runs"]["lstm"], results["runs"]["transformer"]
    assert 0.8 < lstm["parameters"] / transformer["parameters"] < 1.25  # a fair match
    for run in (lstm, transformer):  # both trained for the same budget (capped in smoke)
        budget_steps = max(4, int(results["budget_s"] / run["step_time_s"]))
        assert run["steps"] == min(budget_steps, 8)
    assert all(t > 0 for times in results["step_time_s"].values() for t in times)


def test_residual_and_norm_variants_each_give_a_training_curve(tmp_path, data_dir):
    results = run_smoke("residual_norm", tmp_path, data_dir,
                        {"residual_norm_training.png", "residual_norm_accuracy.png"})
    assert set(results["runs"]) == {"post-LN", "no residual"}  # smoke: 2 of the 6
    assert all(run["curve"] for run in results["runs"].values())


def test_hyperparameter_settings_train_side_by_side(tmp_path, data_dir):
    results = run_smoke("hparams", tmp_path, data_dir, {"hparams_accuracy.png"})
    finite_runs(results)
    assert len(results["runs"]) == 2


def test_unknown_experiment_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="choose one of positional, scaling"):
        experiments.run("bogus", str(tmp_path))


def assert_attention_maps_are_distributions(workdir):
    from t2t_jax.decode import load_decoder
    from t2t_jax.guide.attention_maps import capture_attention

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
