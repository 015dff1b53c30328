"""`t2t-jax experiment NAME --output DIR [--smoke]`: the runs behind docs/paper_guide.md.

Each experiment trains (or probes) small models on the built-in tasks, seeded, in minutes on two
CPU cores, and writes NAME.json (its figures) and PNG plots under DIR; `--smoke` runs a reduced
version in seconds, for tests. The functions return the JSON they write.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from t2t_jax.guide.attention_maps import attention_maps
from t2t_jax.guide.runs import plt_module, task_config, train_variant, write_results
from t2t_jax.model.embedding import sinusoidal_encoding
from t2t_jax.model.kernels import attention_weights

# --- positional: question 4 ------------------------------------------------------------------


def positional(output: str, smoke: bool, data_dir: str | None = None) -> dict[str, Any]:
    """The sinusoidal encoding, and reversal trained on lengths 1-12 with sinusoidal, learned or
    no positions, tested on 1-12 (validation) and 13-24 (test)."""
    plt = plt_module()
    positions = jnp.arange(64)
    table = np.asarray(sinusoidal_encoding(positions, 128))
    similarity = table @ table.T
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.imshow(table.T, aspect="auto", cmap="RdBu")
    a.set(xlabel="position", ylabel="dimension", title="PE(pos, i), d_model 128")
    b.imshow(similarity, cmap="viridis")
    b.set(xlabel="position", ylabel="position", title="PE(p) . PE(q): depends on |p - q|")
    fig.tight_layout()
    fig.savefig(os.path.join(output, "positional_encoding.png"), dpi=100)
    plt.close(fig)

    runs = {}
    for kind in ("sinusoidal", "learned", "none"):
        config = task_config("reverse", smoke, 1500, data_dir, max_length=12, test_max_length=24)
        config.model.positional = kind
        config.model.max_positions = 32
        runs[kind] = train_variant(config, os.path.join(output, "runs", f"positional_{kind}"))
    _bar_plot(plt, runs, ["eval_accuracy", "test_accuracy"],
              ["lengths 1-12 (trained)", "lengths 13-24 (longer)"],
              "reverse: token accuracy by positional encoding",
              os.path.join(output, "positional_accuracy.png"))
    # Similarity falls off with distance and is the same for every pair at one distance.
    offsets = [float(np.mean(np.diag(similarity, k))) for k in (0, 1, 4, 16)]
    return write_results(output, "positional", {"similarity_at_distance_0_1_4_16": offsets,
                                          "runs": runs})


def _bar_plot(plt, runs, keys, labels, title, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(runs)
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(zip(keys, labels, strict=True)):
        ax.bar(np.arange(len(names)) + i * width, [runs[n].get(key, 0) for n in names], width,
               label=label)
    ax.set_xticks(np.arange(len(names)) + width * (len(keys) - 1) / 2, names, rotation=20,
                  ha="right", fontsize=8)
    ax.set(ylim=(0, 1), ylabel="token accuracy", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- scaling: question 7 ---------------------------------------------------------------------


def softmax_statistics(d_k: int, scaled: bool, keys: int = 64, samples: int = 256,
                       seed: int = 0) -> dict[str, float]:
    """For queries and keys with unit-variance components: the mean entropy of the attention
    weights (nats; log(keys) is uniform) and the mean norm of their gradient with respect to
    the logits (the softmax Jacobian), which vanishes as the softmax saturates."""
    rng = jax.random.split(jax.random.key(seed), 2)
    query = jax.random.normal(rng[0], (samples, 1, 1, d_k))
    key = jax.random.normal(rng[1], (samples, keys, 1, d_k))
    if not scaled:
        query = query * jnp.sqrt(d_k)  # attention_weights divides by sqrt(d_k)
    weights = attention_weights(query, key, None)[:, 0, 0]  # [samples, keys]
    entropy = -jnp.sum(weights * jnp.log(weights + 1e-30), axis=-1)
    # d softmax / d logits = diag(p) - p p^T
    jacobian = jax.vmap(lambda p: jnp.diag(p) - jnp.outer(p, p))(weights)
    return {
        "entropy": float(jnp.mean(entropy)),
        "max_weight": float(jnp.mean(jnp.max(weights, axis=-1))),
        "jacobian_norm": float(jnp.mean(jnp.linalg.norm(jacobian, axis=(1, 2)))),
    }


def scaling(output: str, smoke: bool, data_dir: str | None = None) -> dict[str, Any]:
    """Softmax entropy and gradient size with and without 1/sqrt(d_k) as d_k grows, and
    training curves of a d_k = 128 model (2 heads of d_model 256) with and without it."""
    plt = plt_module()
    depths = [4, 16, 64, 256] if smoke else [4, 8, 16, 32, 64, 128, 256, 512, 1024]
    probe = {str(s): [softmax_statistics(d, s) for d in depths] for s in (True, False)}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for scaled, label in ((True, "scaled by 1/sqrt(d_k)"), (False, "unscaled")):
        stats = probe[str(scaled)]
        a.plot(depths, [s["entropy"] for s in stats], marker="o", label=label)
        b.plot(depths, [s["jacobian_norm"] for s in stats], marker="o", label=label)
    a.axhline(np.log(64), ls=":", c="gray", label="uniform over 64 keys")
    a.set(xscale="log", xlabel="d_k", ylabel="entropy (nats)", title="attention entropy")
    b.set(xscale="log", yscale="log", xlabel="d_k", ylabel="||d softmax / d logits||",
          title="gradient through the softmax")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output, "scaling_softmax.png"), dpi=100)
    plt.close(fig)

    runs = {}
    for scaled in (True, False):
        config = task_config("reverse", smoke, 800, data_dir)
        config.model.d_model, config.model.num_heads, config.model.d_ff = 256, 2, 512
        config.model.num_encoder_layers = config.model.num_decoder_layers = 1
        config.model.scale_attention = scaled
        name = "scaled" if scaled else "unscaled"
        runs[name] = train_variant(config, os.path.join(output, "runs", f"scaling_{name}"))
    _curve_plot(plt, runs, "reverse, d_k = 128: training loss",
                os.path.join(output, "scaling_training.png"))
    return write_results(output, "scaling", {"d_k": depths, "softmax": probe, "runs": runs})


def _curve_plot(plt, runs, title, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        steps, losses = zip(*run["curve"], strict=True) if run["curve"] else ((), ())
        ax.plot(steps, losses, label=name)
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- heads: questions 3 and 9 ----------------------------------------------------------------


def heads(output: str, smoke: bool, data_dir: str | None = None) -> dict[str, Any]:
    """1, 2, 4, 8 and 16 heads at d_model 64 (d_k = 64/h), as Table 3's rows (A), on sorting,
    where each output position must find one input among many."""
    plt = plt_module()
    runs = {}
    for count in (1, 4) if smoke else (1, 2, 4, 8, 16):
        config = task_config("sort", smoke, 1000, data_dir)
        config.model.num_heads = count
        workdir = os.path.join(output, "runs", f"heads_{count}")
        runs[f"{count} heads"] = train_variant(config, workdir)
    _bar_plot(plt, runs, ["eval_accuracy", "test_accuracy"],
              ["lengths 1-20", "lengths 21-40"], "sort, d_model 64: token accuracy by heads",
              os.path.join(output, "heads_accuracy.png"))
    _curve_plot(plt, runs, "sort, d_model 64: training loss",
                os.path.join(output, "heads_training.png"))
    return write_results(output, "heads", {"runs": runs})


# --- attention maps: questions 2, 3 and 6 ----------------------------------------------------


# --- rnn_vs_transformer: questions 1, 5 and 10 ----------------------------------------------


def parameter_count(config: ml_collections.ConfigDict, vocab_size: int) -> int:
    from t2t_jax.model import ModelConfig, build_model

    model = build_model(ModelConfig.from_config(config.model, vocab_size))
    dummy = jnp.ones((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs=dummy, targets=dummy))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def rnn_vs_transformer(output: str, smoke: bool, data_dir: str | None = None) -> dict[str, Any]:
    """An LSTM encoder-decoder with attention of about the Transformer's parameter count:
    train step time against sequence length (the recurrence is sequential in length), and
    reversal accuracy after the same wall-clock budget of training."""
    from t2t_jax.data.tasks import expected_vocab_size
    from t2t_jax.model import ModelConfig
    from t2t_jax.perf import bench

    plt = plt_module()
    configs = {"transformer": task_config("reverse", smoke, 0, data_dir)}
    configs["lstm"] = task_config("reverse", smoke, 0, data_dir)
    configs["lstm"].model.type, configs["lstm"].model.d_model = "lstm_seq2seq", 80
    vocab = expected_vocab_size(configs["transformer"])
    # Smoke runs time the training length alone, which then also sets the budget's steps.
    training_length = configs["transformer"].data.max_source_length
    lengths = [training_length] if smoke else [16, 32, 64, 128, 256]
    timing: dict[str, list] = {}
    for name, config in configs.items():
        model_config = ModelConfig.from_config(config.model, vocab)
        timing[name] = []
        for length in lengths:
            rows = config.data.batch_size if smoke else max(1, 2048 // length)
            point = bench.measure_point(config, model_config, length, rows, "train", 2, 1.0)
            timing[name].append(point.step_time_s)
    budget_s = 3.0 if smoke else 150.0
    runs = {}
    for name, config in configs.items():
        model_config = ModelConfig.from_config(config.model, vocab)
        step = timing[name][0] if smoke else bench.measure_point(
            config, model_config, training_length, config.data.batch_size, "train", 3, 1.0
        ).step_time_s
        config.train.num_steps = max(4, int(budget_s / step))
        if smoke:  # a tiny step would fill even 3 s with hundreds of steps
            config.train.num_steps = min(config.train.num_steps, 8)
        config.train.warmup_steps = max(1, config.train.num_steps // 5)
        config.train.eval_every = config.train.checkpoint_every = config.train.num_steps
        config.train.log_every = max(config.train.num_steps // 20, 1)
        runs[name] = train_variant(config, os.path.join(output, "runs", f"rnn_{name}")) | {
            "steps": config.train.num_steps, "step_time_s": step,
            "parameters": parameter_count(config, vocab),
        }
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, times in timing.items():
        a.plot(lengths, times, marker="o", label=name)
    a.set(xscale="log", yscale="log", xlabel="sequence length (tokens per step fixed)",
          ylabel="train step (s)", title="step time against length")
    a.legend()
    names = list(runs)
    b.bar(names, [runs[n]["eval_accuracy"] for n in names])
    b.set(ylim=(0, 1), ylabel="validation token accuracy",
          title=f"reverse after {budget_s:.0f} s of training")
    fig.tight_layout()
    fig.savefig(os.path.join(output, "rnn_vs_transformer.png"), dpi=100)
    plt.close(fig)
    return write_results(output, "rnn_vs_transformer", {
        "lengths": lengths, "step_time_s": timing, "budget_s": budget_s, "runs": runs,
    })


# --- residual_norm: question 8 ---------------------------------------------------------------


def residual_norm(output: str, smoke: bool, data_dir: str | None = None) -> dict[str, Any]:
    """3+3 layers on sorting: post-LN (the paper), pre-LN and no residual connections, each
    with the paper's warmup (a fifth of the run) and without (full rate from step 1)."""
    plt = plt_module()
    runs = {}
    variants = (("post", True), ("post", False)) if smoke else (
        ("post", True), ("pre", True), ("post", False))
    for norm, residual in variants:
        for warmup in (True,) if smoke else (True, False):
            config = task_config("sort", smoke, 400, data_dir)
            if not smoke:  # smoke runs check the plumbing: one layer a side compiles faster
                config.model.num_encoder_layers = config.model.num_decoder_layers = 3
            config.model.norm, config.model.residual = norm, residual
            if not warmup:
                config.train.warmup_steps = 1
            name = f"{norm}-LN" if residual else "no residual"
            name += "" if warmup else ", no warmup"
            runs[name] = train_variant(
                config, os.path.join(output, "runs", "residual_" + name.replace(" ", "_")
                                     .replace(",", "").replace("-", "_"))
            )
    _curve_plot(plt, runs, "sort, 3+3 layers: training loss",
                os.path.join(output, "residual_norm_training.png"))
    _bar_plot(plt, runs, ["eval_accuracy"], ["lengths 1-20"],
              "sort, 3+3 layers: validation token accuracy",
              os.path.join(output, "residual_norm_accuracy.png"))
    return write_results(output, "residual_norm", {"runs": runs})


# --- hparams: question 9 ---------------------------------------------------------------------


HPARAM_VARIANTS = {
    "base (d_ff 256, dropout 0, eps_ls 0.1, warmup 1/5)": {},
    "d_ff 64": {"model.d_ff": 64},
    "d_ff 1024": {"model.d_ff": 1024},
    "dropout 0.1": {"model.dropout_rate": 0.1},
    "dropout 0.3": {"model.dropout_rate": 0.3},
    "label smoothing 0": {"train.label_smoothing": 0.0},
    "warmup 1/50": {"train.warmup_steps": -50},  # negative: a fraction 1/50 of the steps
    "1 layer each side": {"model.num_encoder_layers": 1, "model.num_decoder_layers": 1},
}


def hparams(output: str, smoke: bool, data_dir: str | None = None) -> dict[str, Any]:
    """One change at a time from a small base model on sorting, as the paper's Table 3 varies
    one hyperparameter per row."""
    plt = plt_module()
    runs = {}
    variants = dict(list(HPARAM_VARIANTS.items())[:2]) if smoke else HPARAM_VARIANTS
    for i, (name, changes) in enumerate(variants.items()):
        config = task_config("sort", smoke, 300, data_dir)
        for key, value in changes.items():
            section, field = key.split(".")
            if field == "warmup_steps" and value < 0:
                value = max(1, config.train.num_steps // -value)
            config[section][field] = value
        runs[name] = train_variant(config, os.path.join(output, "runs", f"hparams_{i}"))
    _bar_plot(plt, runs, ["eval_accuracy", "test_accuracy"], ["lengths 1-20", "lengths 21-40"],
              "sort: one change at a time", os.path.join(output, "hparams_accuracy.png"))
    return write_results(output, "hparams", {"runs": runs})


EXPERIMENTS: dict[str, Callable[..., dict[str, Any]]] = {
    "positional": positional,
    "scaling": scaling,
    "heads": heads,
    "attention_maps": attention_maps,
    "rnn_vs_transformer": rnn_vs_transformer,
    "residual_norm": residual_norm,
    "hparams": hparams,
}


def run(name: str, output: str, smoke: bool = False, **options: Any) -> dict[str, Any]:
    """Runs experiment `name`, writing NAME.json and its plots under `output`; `options` go to
    the experiment (data_dir; workdir and text for attention_maps)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    os.makedirs(output, exist_ok=True)
    logging.info("experiment %s -> %s%s", name, output, " (smoke)" if smoke else "")
    return EXPERIMENTS[name](output, smoke, **options)
