"""Greedy decoding: the jitted loop equals step-by-step argmax over the growing prefix."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

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


@pytest.fixture(scope="module")
def mesh_trained_workdir(tmp_path_factory):
    """A tiny model trained on all 8 fake devices as a (data=4, tensor=2) mesh, with
    checkpoints at steps 2, 4 and 6."""
    from t2t_jax.train import train_and_evaluate
    from tests.conftest import make_tiny_config

    root = tmp_path_factory.mktemp("decode")
    config = make_tiny_config(str(root / "tfds"))
    config.mesh.ici.update(dict(data=4, fsdp=1, tensor=2))
    config.train.update(num_steps=6, checkpoint_every=2, keep_checkpoints=3)
    workdir = str(root / "run")
    train_and_evaluate(config, workdir, jax.devices())
    return workdir


def test_a_mesh_trained_checkpoint_decodes_on_this_machines_devices(mesh_trained_workdir):
    from t2t_jax import checkpoint
    from t2t_jax.decode import load_translator, translate

    translator = load_translator(mesh_trained_workdir)
    assert translator.step == 6
    # Params replicated on the local devices, batches split over them (the one-device case is
    # the command-line test below, run with a single CPU device).
    leaves = jax.tree.leaves(translator.params)
    assert all(len(leaf.devices()) == jax.local_device_count() for leaf in leaves)
    assert translator.place_batch(np.zeros((16, 4), np.int32)).sharding.spec == P("data")
    host, _ = checkpoint.restore_host_state(mesh_trained_workdir, 6)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(translator.params), host["params"])
    sources = ["1 2 3", "4 5 6 7 8", "9"]
    outputs, stats = translate(translator, sources, batch_size=2, progress=False)
    expected = decode_texts(translator.model, host["params"], translator.tokenizer, sources,
                            "encoder_decoder", 16, 16 + 50)
    assert outputs == expected
    assert stats["sentences_per_s"] > 0


def test_average_is_the_mean_of_the_last_checkpoints(mesh_trained_workdir, tmp_path):
    from t2t_jax import checkpoint

    output = str(tmp_path / "averaged")
    assert checkpoint.average_checkpoints(mesh_trained_workdir, 2, output) == [4, 6]
    averaged, step = checkpoint.restore_host_state(output)
    four, _ = checkpoint.restore_host_state(mesh_trained_workdir, 4)
    six, _ = checkpoint.restore_host_state(mesh_trained_workdir, 6)
    assert step == 6
    jax.tree.map(
        lambda a, b, c: np.testing.assert_allclose(a, (b + c) / 2, rtol=1e-6),
        averaged["params"], four["params"], six["params"],
    )
    with pytest.raises(ValueError, match="has 3; pass --last 3"):
        checkpoint.average_checkpoints(mesh_trained_workdir, 5, output)


def test_decode_command_reads_stdin_and_writes_stdout_in_order(mesh_trained_workdir):
    from tests.test_cli import t2t_jax

    result = t2t_jax("decode", "--workdir", mesh_trained_workdir, input="1 2 3\n9 9\n\n4\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.split("\n")) == 5  # four outputs, each ending its line
    assert "sentences/s" in result.stderr and "tokens/s" in result.stderr
    missing = t2t_jax("decode", "--workdir", mesh_trained_workdir + "_nope", input="1\n")
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_cached_decoding_gives_the_uncached_logits_at_every_step():
    from t2t_jax.decode import decode_step, init_cache

    model, params = init("encoder_decoder")
    inputs = jnp.array([[5, 6, 7, EOS_ID, 0], [8, 9, EOS_ID, 0, 0]])
    targets = jnp.array([[4, 5, 6, 7, EOS_ID, 3], [9, 8, EOS_ID, 4, 4, 4]])
    full = model.apply({"params": params}, inputs, targets)
    encoded = model.apply({"params": params}, inputs, method=model.encode)
    cache = init_cache(model, params, encoded, inputs, targets.shape[1])
    last = jnp.zeros((2,), jnp.int32)
    for i in range(targets.shape[1]):
        logits, cache = decode_step(model, params, cache, encoded, inputs, last)
        np.testing.assert_allclose(logits, full[:, i], atol=1e-5)
        last = targets[:, i]


def test_beam_of_one_without_length_penalty_is_greedy():
    from t2t_jax.decode import beam_translate

    model, params = init("encoder_decoder")
    inputs = jnp.array([[5, 6, 7, EOS_ID, 0], [8, 9, EOS_ID, 0, 0], [3, EOS_ID, 0, 0, 0]])
    greedy = np.asarray(greedy_translate(model, params, inputs, 8))
    beam = np.asarray(beam_translate(model, params, inputs, 1, 8, 0.0))
    for g, b in zip(greedy, beam, strict=True):
        g = g.tolist()
        g = g[: g.index(EOS_ID) + 1] if EOS_ID in g else g
        assert b.tolist()[: len(g)] == g


def test_beam_search_scores_at_least_greedy():
    from t2t_jax.decode import beam_translate

    model, params = init("encoder_decoder")
    inputs = jnp.array([[5, 6, 7, EOS_ID, 0], [8, 9, EOS_ID, 0, 0]])

    def log_prob(outputs):
        # Sum of log-probabilities up to and including EOS, under teacher forcing.
        logits = model.apply({"params": params}, inputs, jnp.asarray(outputs))
        log_p = jax.nn.log_softmax(logits.at[..., 0].set(-1e7))
        picked = np.take_along_axis(np.asarray(log_p), np.asarray(outputs)[..., None], -1)[..., 0]
        ends = [list(o).index(EOS_ID) + 1 if EOS_ID in list(o) else len(o) for o in outputs]
        return np.array([picked[r, :e].sum() for r, e in enumerate(ends)])

    greedy = np.asarray(greedy_translate(model, params, inputs, 8))
    beam = np.asarray(beam_translate(model, params, inputs, 4, 8, 0.0))
    assert (log_prob(beam) >= log_prob(greedy) - 1e-4).all()


@pytest.fixture(scope="module")
def reverse_workdir(tmp_path_factory):
    """A small model trained to near-perfect accuracy on reversing 1-6 symbols (~40 s)."""
    from t2t_jax.train import train_and_evaluate
    from tests.conftest import make_tiny_config

    root = tmp_path_factory.mktemp("reverse")
    config = make_tiny_config(str(root / "tfds"))
    config.data.algorithmic.num_train = 4096
    config.data.batch_size = 32
    config.model.update(d_model=64, d_ff=128, num_encoder_layers=2, num_decoder_layers=2)
    config.train.update(num_steps=2000, warmup_steps=100, log_every=500, eval_every=2000,
                        checkpoint_every=2000)
    workdir = str(root / "run")
    result = train_and_evaluate(config, workdir, jax.devices()[:1])
    assert result["eval_accuracy"] > 0.99
    return workdir


def test_beam_search_reverses_on_a_trained_model(reverse_workdir):
    from t2t_jax.data import tasks
    from t2t_jax.decode import load_translator, translate

    translator = load_translator(reverse_workdir)
    builder = tasks.builder_from_config(translator.config.data)
    pairs = [(ex["inputs"].decode(), ex["targets"].decode())
             for ex in builder.as_dataset(split="validation").as_numpy_iterator()]
    sources = [s for s, _ in pairs]
    beam, _ = translate(translator, sources, batch_size=16, progress=False, beam_size=4)
    # A 2,000-step model: its last error or two move with float rounding in training.
    exact = sum(b == t for b, (_, t) in zip(beam, pairs, strict=True))
    assert exact >= len(pairs) - 1


def test_sampler_respects_top_k_and_top_p():
    from t2t_jax.decode import sampler

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    top2 = np.asarray([sampler(top_k=2)(logits, k)[0] for k in keys[:100]])
    assert set(top2) <= {0, 1} and len(set(top2)) == 2
    top_p = np.asarray([sampler(top_p=0.7)(logits, k)[0] for k in keys[:100]])
    assert set(top_p) <= {0, 1}  # 0.5 + 0.3 reaches 0.7
    cold = np.asarray([sampler(temperature=0.01)(logits, k)[0] for k in keys[:50]])
    assert set(cold) == {0}


def test_sampling_the_lm_keeps_prompts_and_varies_with_the_seed():
    from t2t_jax.decode import sample_continue

    model, params = init("decoder_only")
    tokens = jnp.array([[5, 6, EOS_ID, 0, 0, 0, 0, 0]] * 2)
    start = jnp.array([3, 3])
    a = np.asarray(sample_continue(model, params, tokens, start, jax.random.key(0)))
    b = np.asarray(sample_continue(model, params, tokens, start, jax.random.key(1)))
    np.testing.assert_array_equal(a[:, :3], tokens[:, :3])
    assert (a[:, 3:] != 0).all()  # never padding
    assert not np.array_equal(a, b)


def test_corrupt_checkpoint_or_missing_tokenizer_is_a_clear_error(mesh_trained_workdir, tmp_path):
    import shutil

    from t2t_jax.decode import load_translator

    broken = str(tmp_path / "broken")
    shutil.copytree(mesh_trained_workdir, broken)
    state_dir = os.path.join(broken, "checkpoints", "6", "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(ValueError, match="could not be read.*another --step"):
        load_translator(broken)
    shutil.rmtree(os.path.join(broken, "checkpoints", "4", "tokenizer"))
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_translator(broken, step=4)


def test_overlong_input_is_cut_with_a_warning(mesh_trained_workdir, caplog):
    from t2t_jax.decode import load_translator, translate

    translator = load_translator(mesh_trained_workdir)
    long_line = " ".join(["3"] * 40)  # over data.test_max_source_length = 10
    with caplog.at_level("WARNING"):
        outputs, _ = translate(translator, [long_line, "1 2"], batch_size=8, progress=False,
                               beam_size=2)
    assert len(outputs) == 2
    assert "over 10 tokens and were cut" in caplog.text
