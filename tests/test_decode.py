"""Decoding: the one path (sort, bucket, batch, input order), its searches over the key/value
cache for both kinds of model, n-best, ensembles and teacher-forced scores."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from t2t_jax.data.tokenizer import EOS_ID, SymbolTokenizer
from t2t_jax.decode import (
    DecodeOptions,
    Search,
    best_texts,
    decoder_for_params,
    load_decoder,
    search_batch,
    translate,
)
from t2t_jax.model import ModelConfig, build_model
from tests.conftest import FAST_COMPILE_XLA_FLAGS, make_tiny_config

TINY = dict(vocab_size=13, num_encoder_layers=1, num_decoder_layers=2, d_model=32, d_ff=64,
            num_heads=4, dropout_rate=0.0)


def init(model_type):
    model = build_model(ModelConfig(**TINY, type=model_type))
    ones = jnp.ones((1, 4), jnp.int32)
    kwargs = {"targets": ones} if model_type == "decoder_only" else {"inputs": ones,
                                                                     "targets": ones}
    return model, nn.meta.unbox(model.init(jax.random.key(0), **kwargs)["params"])


GREEDY = Search(beam_size=1)


def run_search(model, params, inputs, length, settings=GREEDY, seed=0):
    found = search_batch((model,), (params,), jnp.asarray(inputs), jax.random.key(seed),
                         settings, length)
    return jax.tree.map(np.asarray, found)


def test_greedy_search_equals_step_by_step_argmax():
    model, params = init("encoder_decoder")
    inputs = jnp.array([[5, 6, 7, EOS_ID, 0], [8, 9, EOS_ID, 0, 0]])
    out = run_search(model, params, inputs, 6).tokens[:, 0]
    for row in range(2):
        prefix = []
        while len(prefix) < 6 and EOS_ID not in prefix:
            # Reference: re-run the model on the prefix plus a placeholder for the next token
            # (padded to one length, one compilation: later tokens change no earlier logit).
            targets = np.zeros((1, 7), np.int32)
            targets[0, : len(prefix) + 1] = prefix + [EOS_ID]
            logits = _jitted_apply(model)({"params": params}, inputs[row : row + 1],
                                          targets)[0, len(prefix)]
            prefix.append(int(jnp.argmax(logits.at[0].set(-jnp.inf))))
        assert out[row].tolist() == prefix + [0] * (6 - len(prefix))  # padding after EOS


def test_greedy_lm_keeps_the_prompt_and_matches_an_uncached_reference():
    model, params = init("decoder_only")
    prompts = jnp.array([[5, 6, EOS_ID], [7, EOS_ID, 0]])
    out = run_search(model, params, prompts, 5).tokens[:, 0]
    np.testing.assert_array_equal(out[0, :3], [5, 6, EOS_ID])
    np.testing.assert_array_equal(out[1, :2], [7, EOS_ID])
    prefix = [7, EOS_ID]
    while len(prefix) < 7 and EOS_ID not in prefix[2:]:
        tokens = np.zeros((1, 8), np.int32)
        tokens[0, : len(prefix) + 1] = prefix + [EOS_ID]
        logits = _jitted_apply(model)({"params": params}, tokens)[0, len(prefix)]
        prefix.append(int(jnp.argmax(logits.at[0].set(-jnp.inf))))
    assert out[1, : len(prefix)].tolist() == prefix


def test_cached_lm_logits_equal_uncached_logits_at_every_step():
    from t2t_jax.model.models import init_lm_cache, lm_step

    model, params = init("decoder_only")
    tokens = jnp.array([[5, 6, EOS_ID, 7, 8, EOS_ID, 3], [7, EOS_ID, 4, 4, 9, 9, 9]])
    full = model.apply({"params": params}, tokens)
    cache = init_lm_cache(model, params, 2, tokens.shape[1])
    last = jnp.zeros((2,), jnp.int32)
    for i in range(tokens.shape[1]):
        logits, cache = lm_step(model, params, cache, last)
        np.testing.assert_allclose(logits, full[:, i], atol=1e-5)
        last = tokens[:, i]


def tiny_decoder(model_type="encoder_decoder", max_source_length=8):
    model, params = init(model_type)
    tokenizer = SymbolTokenizer([str(i) for i in range(10)])
    config = ModelConfig(**TINY, type=model_type)
    return decoder_for_params(config, params, tokenizer, None, max_source_length)


@functools.cache
def _jitted_apply(model):
    return jax.jit(model.apply)


def teacher_forced_log_probs(decoder, source, output, length=24):
    """log-softmax [len(output), vocab] of the model at each output position, fed the source and
    the output before it (the decoder-only model: source, then output, as one sequence). Rows
    are padded to `length` (one compilation): later tokens do not change earlier logits."""
    model, params = decoder.model, decoder.params[0]
    apply = _jitted_apply(model)
    if decoder.model_type.joins_source_and_target:
        row = np.zeros((1, length), np.int32)
        row[0, : len(source) + len(output)] = source + output
        logits = apply({"params": params}, row)[0, len(source) : len(source) + len(output)]
    else:
        inputs, targets = np.zeros((1, 8), np.int32), np.zeros((1, length), np.int32)
        inputs[0, : len(source)], targets[0, : len(output)] = source, output
        logits = apply({"params": params}, inputs, targets)[0, : len(output)]
    return jax.nn.log_softmax(logits.astype(jnp.float32))


@pytest.mark.parametrize("model_type", ["encoder_decoder", "decoder_only"])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_target_prefixes_are_forced_and_left_out_of_the_scores(model_type, beam_size):
    from t2t_jax.decode import batch_lengths, decode_ids

    decoder = tiny_decoder(model_type)
    sources = [[5, 6, 7, EOS_ID], [8, EOS_ID], [9, 4, EOS_ID]]
    prefixes = [[3, 3], [], [7]]
    options = DecodeOptions(Search(beam_size, alpha=0.0, nbest=beam_size), batch_size=4,
                            extra_length=4)
    forced, _ = decode_ids(decoder, sources, options, prefixes=prefixes)
    plain, _ = decode_ids(decoder, sources, options)
    assert forced[1] == plain[1]  # no prefix: as if none were given
    source_length, output_length = batch_lengths(decoder, options, 4)
    if decoder.model_type.joins_source_and_target:
        output_length += source_length  # the buffer holds the prompt too
    for source, prefix, hypotheses in zip(sources, prefixes, forced, strict=True):
        room = output_length - decoder.model_type.output_begin(len(source))
        for h in hypotheses:
            assert h.ids[: len(prefix)] == prefix
            # EOS is the last chosen token unless the buffer filled up first.
            chosen = h.ids[len(prefix):] + ([EOS_ID] if len(h.ids) < room else [])
            log_probs = teacher_forced_log_probs(decoder, source, h.ids + [EOS_ID])
            expected = sum(float(log_probs[len(prefix) + i, t]) for i, t in enumerate(chosen))
            np.testing.assert_allclose(h.log_prob, expected, atol=2e-4)
            assert h.score == pytest.approx(h.log_prob)  # alpha 0: no length penalty
    with pytest.raises(ValueError, match="target prefix 1 has 30 tokens, over the"):
        decode_ids(decoder, sources, options, prefixes=[[3] * 30, [], []])


def test_translate_returns_one_output_per_line_in_order_whatever_the_batching():
    decoder = tiny_decoder()
    sources = ["1 2 3", "4", "", "5 6 7 8 9 0"]
    results, stats = translate(decoder, sources, DecodeOptions(Search(beam_size=1),
                                                               batch_size=2))
    assert len(results) == 4 and stats["sentences_per_s"] > 0
    assert results[2][0].text == "" and results[2][0].ids == []  # empty line: empty output
    for hypotheses in results:
        assert all(symbol in decoder.tokenizer.symbols for symbol in hypotheses[0].text.split())
    # A batch of one, in another bucket, gives the same output as inside a sorted batch.
    single, _ = translate(decoder, sources[1:2], DecodeOptions(Search(beam_size=1)))
    assert single[0][0].text == results[1][0].text
    # A decoder built again (as training builds one at every eval) reuses the compiled search.
    compiled = search_batch._cache_size()
    translate(tiny_decoder(), sources[1:2], DecodeOptions(Search(beam_size=1)))
    assert search_batch._cache_size() == compiled


# Session scope: a worker may run other modules' tests between this group's, and a module
# fixture would be trained again after them.
@pytest.fixture(scope="session")
def mesh_trained_workdir(tmp_path_factory):
    """A tiny model trained on all 8 fake devices as a (data=4, tensor=2) mesh, with
    checkpoints at steps 2, 4 and 6."""
    from t2t_jax.train import train_and_evaluate

    root = tmp_path_factory.mktemp("decode")
    config = make_tiny_config(str(root / "tfds"))
    config.mesh.ici.update(dict(data=4, fsdp=1, tensor=2))
    config.train.update(num_steps=6, checkpoint_every=2, keep_checkpoints=3)
    workdir = str(root / "run")
    train_and_evaluate(config, workdir, jax.devices())
    return workdir


@pytest.mark.xdist_group("mesh_model")
def test_a_mesh_trained_checkpoint_decodes_on_this_machines_devices(mesh_trained_workdir):
    from t2t_jax import checkpoint
    from t2t_jax.decode import load_decoder

    decoder = load_decoder(mesh_trained_workdir)
    assert decoder.step == 6
    # Params replicated on the local devices, batches split over them (the one-device case is
    # the command-line test below, run with a single CPU device).
    leaves = jax.tree.leaves(decoder.params)
    assert all(len(leaf.devices()) == jax.local_device_count() for leaf in leaves)
    assert decoder.place_batch(np.zeros((16, 4), np.int32)).sharding.spec == P("data")
    host, _ = checkpoint.restore_host_state(mesh_trained_workdir, 6)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(decoder.params[0]),
                 host["params"])
    sources = ["1 2 3", "4 5 6 7 8", "9"]
    options = DecodeOptions(batch_size=2)
    outputs, stats = translate(decoder, sources, options)
    # The same params in memory (as training decodes them) give the same outputs.
    in_memory = decoder_for_params(decoder.model.config, host["params"], decoder.tokenizer,
                                   decoder.config, decoder.max_source_length)
    assert best_texts(outputs) == best_texts(translate(in_memory, sources, options)[0])
    assert stats["sentences_per_s"] > 0


@pytest.mark.xdist_group("mesh_model")
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
    with pytest.raises(ValueError, match="has 3; average fewer"):
        checkpoint.average_checkpoints(mesh_trained_workdir, 5, output)
    # Averaged in memory for decoding (evaluate --average): the same params, nothing written;
    # up to --step, the newest that far.
    from t2t_jax.decode import load_decoder

    in_memory = load_decoder(mesh_trained_workdir, average=2)
    assert in_memory.step == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(in_memory.params[0]),
                 averaged["params"])
    assert load_decoder(mesh_trained_workdir, step=4, average=2).step == 4
    with pytest.raises(ValueError, match="has 1 up to step 2"):
        load_decoder(mesh_trained_workdir, step=2, average=2)


@pytest.mark.xdist_group("mesh_model")
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
    from t2t_jax.model.models import decode_step, init_cache

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


@pytest.mark.parametrize("model_type", ["encoder_decoder", "decoder_only"])
def test_beam_of_one_without_length_penalty_is_greedy(model_type):
    model, params = init(model_type)
    inputs = jnp.array([[5, 6, 7, EOS_ID, 0], [8, 9, EOS_ID, 0, 0], [3, EOS_ID, 0, 0, 0]])
    greedy = run_search(model, params, inputs, 8)
    beam = run_search(model, params, inputs, 8, Search(beam_size=1, alpha=0.0))
    for g, b in zip(greedy.tokens[:, 0], beam.tokens[:, 0], strict=True):
        g = g.tolist()
        g = g[: g.index(EOS_ID, 4 if model_type == "decoder_only" else 0) + 1] if (
            EOS_ID in g[4 if model_type == "decoder_only" else 0:]) else g
        assert b.tolist()[: len(g)] == g
    np.testing.assert_allclose(beam.log_prob, greedy.log_prob, rtol=1e-5)


def teacher_forced_log_prob(model, params, inputs, outputs):
    """Sum of log-probabilities up to and including EOS of each row of outputs [rows, length]."""
    logits = model.apply({"params": params}, inputs, jnp.asarray(outputs))
    log_p = np.asarray(jax.nn.log_softmax(logits))
    picked = np.take_along_axis(log_p, np.asarray(outputs)[..., None], -1)[..., 0]
    ends = [list(o).index(EOS_ID) + 1 if EOS_ID in list(o) else len(o) for o in outputs]
    return np.array([picked[r, :e].sum() for r, e in enumerate(ends)])


def test_beam_search_scores_at_least_greedy_and_reports_true_log_probs():
    model, params = init("encoder_decoder")
    inputs = jnp.array([[5, 6, 7, EOS_ID, 0], [8, 9, EOS_ID, 0, 0]])
    greedy = run_search(model, params, inputs, 8)
    beam = run_search(model, params, inputs, 8, Search(beam_size=4, alpha=0.0, nbest=4))
    best = teacher_forced_log_prob(model, params, inputs, beam.tokens[:, 0])
    assert (best >= teacher_forced_log_prob(model, params, inputs, greedy.tokens[:, 0])
            - 1e-4).all()
    # n-best: best first by score, and every hypothesis's log-prob is its teacher-forced one.
    assert (np.diff(beam.score, axis=1) <= 1e-6).all()
    for n in range(4):
        np.testing.assert_allclose(
            beam.log_prob[:, n], teacher_forced_log_prob(model, params, inputs,
                                                         beam.tokens[:, n]), rtol=1e-4)


def test_ensemble_of_a_model_with_itself_is_that_model():
    model, params = init("encoder_decoder")
    inputs = jnp.array([[5, 6, 7, EOS_ID, 0], [8, 9, EOS_ID, 0, 0]])
    for settings in (Search(beam_size=1), Search(beam_size=3, nbest=2)):
        single = search_batch((model,), (params,), inputs, jax.random.key(0), settings, 6)
        pair = search_batch((model, model), (params, params), inputs, jax.random.key(0),
                            settings, 6)
        # The same outputs; their scores within float rounding (XLA fuses two copies of the
        # model's log-softmax in its own way).
        np.testing.assert_array_equal(single.tokens, pair.tokens)
        np.testing.assert_allclose(single.log_prob, pair.log_prob, rtol=1e-6)
        np.testing.assert_allclose(single.score, pair.score, rtol=1e-6)


@pytest.mark.xdist_group("reverse_model")
def test_beam_search_reverses_on_a_trained_model(reverse_workdir):
    from t2t_jax.data import tasks
    from t2t_jax.decode import load_decoder

    decoder = load_decoder(reverse_workdir)
    builder = tasks.builder_from_config(decoder.config.data)
    pairs = [(ex["inputs"].decode(), ex["targets"].decode())
             for ex in builder.as_dataset(split="validation").as_numpy_iterator()]
    sources = [s for s, _ in pairs]
    beam, _ = translate(decoder, sources, DecodeOptions(Search(4, 0.6, nbest=2),
                                                        batch_size=16))
    assert best_texts(beam) == [t for _, t in pairs]
    # The runner-up is a different, less likely output.
    assert all(h[0].score >= h[1].score and h[0].text != h[1].text for h in beam)


def validation_pairs(decoder, count):
    from t2t_jax.data import tasks

    builder = tasks.builder_from_config(decoder.config.data)
    return tasks.text_examples(builder, "validation", decoder.config.data, count)


@pytest.mark.xdist_group("reverse_model")
def test_score_equals_the_eval_steps_loss_sums_without_smoothing(reverse_workdir):
    from t2t_jax.decode import load_decoder
    from t2t_jax.scoring import score_pairs
    from t2t_jax.train_step import eval_step, make_step_fns

    decoder = load_decoder(reverse_workdir)
    sources, targets = validation_pairs(decoder, 6)
    targets[1] = targets[0]  # an unlikely pair scores low
    scores, stats = score_pairs(decoder, sources, targets, batch_size=4)
    config = decoder.config
    config.train.label_smoothing = 0.0
    fns = make_step_fns(config, decoder.model, decoder.model.config.d_model)
    evaluate = jax.jit(lambda params, batch: eval_step(fns, params, batch))
    tokenizer = decoder.tokenizer
    for source, target, score in zip(sources, targets, scores, strict=True):
        # One pair a batch, padded to one shape (one compilation; padding is masked out).
        batch = {"inputs": np.zeros((1, 8), np.int32), "targets": np.zeros((1, 8), np.int32)}
        for key, text in (("inputs", source), ("targets", target)):
            ids = tokenizer.encode(text) + [EOS_ID]
            batch[key][0, : len(ids)] = ids
        sums = evaluate(decoder.params[0], batch)
        assert score.tokens == int(sums["weight"]) == len(tokenizer.encode(target)) + 1
        np.testing.assert_allclose(score.log_prob, -float(sums["loss"]), rtol=1e-5, atol=1e-5)
    assert scores[1].per_token < scores[0].per_token - 1.0 and stats["pairs_per_s"] > 0
    with pytest.raises(ValueError, match="--source has 6 lines and --target 5"):
        score_pairs(decoder, sources, targets[:5])


@pytest.mark.xdist_group("reverse_model")
def test_an_ensemble_of_a_checkpoint_with_itself_decodes_as_it(reverse_workdir, tmp_path):
    import shutil

    from t2t_jax.decode import load_decoder

    single, pair = load_decoder(reverse_workdir), load_decoder([reverse_workdir] * 2)
    assert len(pair.models) == 2
    sources, _ = validation_pairs(single, 16)
    for options in (DecodeOptions(Search(1)), DecodeOptions(Search(4, 0.6, nbest=2))):
        alone, _ = translate(single, sources, options)
        together, _ = translate(pair, sources, options)
        assert [[h.text for h in r] for r in alone] == [[h.text for h in r] for r in together]
    # Models that read text differently cannot be ensembled.
    other = str(tmp_path / "other")
    shutil.copytree(reverse_workdir, other)
    for root, _, files in os.walk(os.path.join(other, "checkpoints")):
        if os.path.basename(root) == "tokenizer" and "metadata" in files:
            with open(os.path.join(root, "metadata"), "w") as f:
                f.write('{"type": "symbols", "symbols": ["a", "b", "c"]}')
    with pytest.raises(ValueError, match="different tokenizers; an ensemble needs"):
        load_decoder([reverse_workdir, other])


@pytest.mark.xdist_group("reverse_model")
def test_decode_and_score_commands_on_a_trained_model(reverse_workdir, tmp_path):
    import json

    from tests.test_cli import t2t_jax

    source = tmp_path / "source.txt"
    source.write_text("3 1 4\n\n5 9\n")
    nbest = t2t_jax("decode", "--workdir", reverse_workdir, "--input", str(source),
                    "--nbest", "2", "--beam_size", "3")
    assert nbest.returncode == 0, nbest.stderr[-2000:]
    rows = [line.split(" ||| ") for line in nbest.stdout.splitlines()]
    # index ||| hypothesis ||| log_prob ||| score, best first; the empty line has one, empty.
    assert [r[0] for r in rows] == ["0", "0", "1", "2", "2"]
    assert rows[0][1] == "4 1 3" and rows[3][1] == "9 5" and rows[2][1] == ""
    assert float(rows[0][3]) >= float(rows[1][3]) and float(rows[3][3]) >= float(rows[4][3])
    target = tmp_path / "target.txt"
    target.write_text("4 1 3\n\n9 5\n")
    scored = t2t_jax("score", "--workdir", reverse_workdir, "--source", str(source),
                     "--target", str(target), "--format", "jsonl")
    assert scored.returncode == 0, scored.stderr[-2000:]
    lines = [json.loads(line) for line in scored.stdout.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert [line["tokens"] for line in lines] == [4, 1, 3]
    # The decoded best and its teacher-forced score are one number.
    np.testing.assert_allclose(lines[0]["log_prob"], float(rows[0][2]), atol=2e-4)
    assert "perplexity" in scored.stderr


@pytest.mark.xdist_group("reverse_model")
def test_decode_on_a_terminal_answers_each_line_as_it_comes(reverse_workdir):
    import pty
    import select
    import subprocess
    import sys

    from tests.test_cli import ROOT

    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "t2t_jax.cli", "decode", "--workdir", reverse_workdir,
         "--beam_size", "1"],
        stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
        env=dict(os.environ, XLA_FLAGS=FAST_COMPILE_XLA_FLAGS),
    )
    os.close(terminal)
    answers = []
    try:
        for line in ("3 1 4", "7 8 1", "5"):
            os.write(controller, (line + "\n").encode())
            # The answer comes before the next line is typed (and before end of input).
            ready, _, _ = select.select([process.stdout], [], [], 120)
            assert ready, f"no answer to {line!r}"
            answers.append(process.stdout.readline().decode().strip())
        os.write(controller, b"\x04")  # Ctrl-D
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        os.close(controller)
    assert answers == ["4 1 3", "1 8 7", "5"]


def test_sampler_respects_top_k_and_top_p():
    from t2t_jax.search import sampler

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    top2 = np.asarray([sampler(top_k=2)(logits, k)[0] for k in keys[:100]])
    assert set(top2) <= {0, 1} and len(set(top2)) == 2
    top_p = np.asarray([sampler(top_p=0.7)(logits, k)[0] for k in keys[:100]])
    assert set(top_p) <= {0, 1}  # 0.5 + 0.3 reaches 0.7
    cold = np.asarray([sampler(temperature=0.01)(logits, k)[0] for k in keys[:50]])
    assert set(cold) == {0}


def test_sampling_the_lm_keeps_prompts_and_varies_with_the_seed():
    model, params = init("decoder_only")
    prompts = jnp.array([[5, 6, EOS_ID]] * 8)
    hot = Search(beam_size=1, temperature=2.0)
    a = run_search(model, params, prompts, 5, hot, seed=0).tokens[:, 0]
    b = run_search(model, params, prompts, 5, hot, seed=1).tokens[:, 0]
    np.testing.assert_array_equal(a[:, :3], prompts)
    for row in a[:, 3:]:  # padding only after the sampled EOS
        ids = row.tolist()
        end = ids.index(EOS_ID) if EOS_ID in ids else len(ids)
        assert 0 not in ids[:end] and set(ids[end + 1 :]) <= {0}
    assert not np.array_equal(a, b)


@pytest.mark.xdist_group("mesh_model")
def test_corrupt_checkpoint_or_missing_tokenizer_is_a_clear_error(mesh_trained_workdir, tmp_path):
    import shutil

    from t2t_jax.decode import load_decoder

    broken = str(tmp_path / "broken")
    shutil.copytree(mesh_trained_workdir, broken)
    state_dir = os.path.join(broken, "checkpoints", "6", "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(ValueError, match="could not be read.*another --step"):
        load_decoder(broken)
    shutil.rmtree(os.path.join(broken, "checkpoints", "4", "tokenizer"))
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_decoder(broken, step=4)


@pytest.mark.xdist_group("mesh_model")
def test_overlong_input_is_cut_with_a_warning_naming_it(mesh_trained_workdir, caplog):
    from t2t_jax.decode import load_decoder

    decoder = load_decoder(mesh_trained_workdir)
    long_line = " ".join(["3"] * 40)  # over data.test_max_source_length = 10
    with caplog.at_level("WARNING"):
        outputs, _ = translate(decoder, ["1 2", long_line], DecodeOptions(Search(2),
                                                                          batch_size=8))
    assert len(outputs) == 2
    assert "over 10 tokens and were cut (lines 2)" in caplog.text


def test_a_workdir_written_before_the_reorganisation_decodes_and_scores_as_it_did(tmp_path):
    import json
    import shutil

    from t2t_jax.scoring import score_pairs

    golden = os.path.join(os.path.dirname(__file__), "golden", "reverse_workdir")
    workdir = shutil.copytree(golden, tmp_path / "workdir")  # decoding must not write to it
    with open(os.path.join(golden, "expected.json")) as f:
        expected = json.load(f)
    decoder = load_decoder(str(workdir))
    assert decoder.step == 600
    greedy, _ = translate(decoder, expected["sources"],
                          DecodeOptions(search=Search(beam_size=1)))
    assert [h[0].text for h in greedy] == expected["greedy"]
    beam, _ = translate(decoder, expected["sources"],
                        DecodeOptions(search=Search(beam_size=4, alpha=0.6, nbest=2)))
    found = [[h.text, h.log_prob, h.score] for hypotheses in beam for h in hypotheses]
    assert [f[0] for f in found] == [e[0] for e in expected["beam4_nbest2"]]
    np.testing.assert_allclose([f[1:] for f in found],
                               [e[1:] for e in expected["beam4_nbest2"]], atol=2e-5)
    scores, _ = score_pairs(decoder, expected["sources"], expected["targets"])
    np.testing.assert_allclose([s.log_prob for s in scores], expected["score_log_probs"],
                               atol=2e-5)


def test_a_symbol_outside_the_vocabulary_is_an_error_naming_it_and_its_line():
    from t2t_jax.data.tokenizer import UnknownSymbol
    from t2t_jax.decode import translate_stream

    decoder = load_decoder(os.path.join(os.path.dirname(__file__), "golden", "reverse_workdir"))
    greedy = DecodeOptions(search=Search(beam_size=1))
    with pytest.raises(UnknownSymbol, match=r"input line 2: symbol 'x' is not in the model's "
                                            r"vocabulary \(0 1 2 3 4 5 6 7 8 9\)"):
        translate(decoder, ["3 1 4", "1 2 x 3"], greedy)
    # Typed line by line, the bad line is reported and the next one still answered.
    outputs, errors = [], []
    translate_stream(decoder, ["1 2 x 3\n", "3 1 4\n"], lambda h: outputs.append(h[0].text),
                     greedy, on_error=errors.append)
    assert errors == ["line 1: symbol 'x' is not in the model's vocabulary "
                      "(0 1 2 3 4 5 6 7 8 9)"]
    assert outputs == ["4 1 3"]


def test_decode_command_forces_each_lines_target_prefix(tmp_path, capsys):
    from t2t_jax.cli import main, parse
    from t2t_jax.cli.args import CommandLineError

    golden = os.path.join(os.path.dirname(__file__), "golden", "reverse_workdir")
    source, prefix = tmp_path / "source.txt", tmp_path / "prefix.txt"
    source.write_text("3 1 4\n1 2 3 4 5\n9 8 7\n")
    prefix.write_text("4 1\n\n1 1\n")  # the right start, none, a wrong start
    assert main(["decode", "--workdir", golden, "--input", str(source), "--target_prefix",
                 str(prefix), "--beam_size", "1", "--format", "jsonl"]) == 0
    import json

    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["text"] == "4 1 3" and rows[1]["text"] == "5 4 3 2 1"
    assert rows[2]["text"].startswith("1 1 ")
    # Forced to its own greedy start, a line scores the rest of its output alone.
    plain = translate(load_decoder(golden), ["3 1 4"], DecodeOptions(Search(beam_size=1)))[0]
    assert rows[0]["log_prob"] > plain[0][0].log_prob
    prefix.write_text("4 1\n")
    args = parse(["decode", "--workdir", golden, "--input", str(source), "--target_prefix",
                  str(prefix)])
    with pytest.raises(CommandLineError, match="--target_prefix has 1 lines and --input 3"):
        args.run(args)
