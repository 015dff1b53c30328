"""`t2t-jax experiment NAME --output DIR [--smoke]`: the runs behind docs/paper_guide.md.

Each experiment trains (or probes) small models on the built-in tasks, seeded, in minutes on two
CPU cores, and writes NAME.json (its figures) and PNG plots under DIR; `--smoke` runs a reduced
version in seconds, for tests. The functions return the JSON they write.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from t2t_jax.config import small_task_config
from t2t_jax.model.attention import attention_weights
from t2t_jax.model.embedding import sinusoidal_encoding


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def task_config(
    task: str, smoke: bool, steps: int, data_dir: str | None, **algorithmic: Any
) -> ml_collections.ConfigDict:
    """A small model (d_model 64) on a built-in task, trained for `steps` (a few in smoke
    mode) and evaluated once at the end; data in `data_dir` (None: TFDS's default)."""
    config = small_task_config(task)
    config.data.data_dir = data_dir
    config.model.d_model, config.model.d_ff, config.model.num_heads = 64, 256, 4
    config.data.algorithmic.update(algorithmic)
    longest = config.data.algorithmic.max_length + (1 if task != "addition" else 2)
    test_longest = config.data.algorithmic.test_max_length + 2
    config.data.max_source_length = config.data.max_target_length = longest
    config.data.test_max_source_length = config.data.test_max_target_length = test_longest
    config.data.algorithmic.num_train = 20_000
    config.data.batch_size = 32
    config.data.eval_batch_size = 100
    config.train.num_steps = 6 if smoke else steps
    config.train.warmup_steps = 2 if smoke else max(steps // 5, 1)
    config.train.learning_rate = 2.0
    config.train.log_every = max(config.train.num_steps // 20, 1)
    config.train.eval_every = config.train.checkpoint_every = config.train.num_steps
    config.train.num_decode_examples = 0
    config.train.async_checkpoints = False
    if smoke:
        config.data.algorithmic.update(num_train=256, num_validation=32, num_test=32)
        config.model.num_encoder_layers = config.model.num_decoder_layers = 1
        config.train.compilation_cache_dir = ""
    return config


def train_variant(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming if done before) and returns its final metrics and
    its training loss curve [(step, loss), ...]."""
    from t2t_jax.train import train_and_evaluate

    result = train_and_evaluate(config, workdir, jax.devices()[:1])
    curve = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                curve.append((row["step"], row["loss"]))
    keys = ("loss", "accuracy", "eval_loss", "eval_accuracy", "test_loss", "test_accuracy")
    return {k: result[k] for k in keys if k in result} | {"curve": curve}


def _write(output: str, name: str, results: dict[str, Any]) -> dict[str, Any]:
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


# --- positional: question 4 ------------------------------------------------------------------


def positional(output: str, smoke: bool, data_dir: str | None = None) -> dict[str, Any]:
    """The sinusoidal encoding, and reversal trained on lengths 1-12 with sinusoidal, learned or
    no positions, tested on 1-12 (validation) and 13-24 (test)."""
    plt = _plt()
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
    return _write(output, "positional", {"similarity_at_distance_0_1_4_16": offsets,
                                          "runs": runs})


def _bar_plot(plt, runs, keys, labels, title, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(runs)
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(zip(keys, labels, strict=True)):
        ax.bar(np.arange(len(names)) + i * width, [runs[n].get(key, 0) for n in names], width,
               label=label)
    ax.set_xticks(np.arange(len(names)) + width * (len(keys) - 1) / 2, names)
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
    plt = _plt()
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
    return _write(output, "scaling", {"d_k": depths, "softmax": probe, "runs": runs})


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
    plt = _plt()
    runs = {}
    for count in (1, 4) if smoke else (1, 2, 4, 8, 16):
        config = task_config("sort", smoke, 1500, data_dir)
        config.model.num_heads = count
        workdir = os.path.join(output, "runs", f"heads_{count}")
        runs[f"{count} heads"] = train_variant(config, workdir)
    _bar_plot(plt, runs, ["eval_accuracy", "test_accuracy"],
              ["lengths 1-20", "lengths 21-40"], "sort, d_model 64: token accuracy by heads",
              os.path.join(output, "heads_accuracy.png"))
    _curve_plot(plt, runs, "sort, d_model 64: training loss",
                os.path.join(output, "heads_training.png"))
    return _write(output, "heads", {"runs": runs})


# --- attention maps: questions 2, 3 and 6 ----------------------------------------------------


def capture_attention(model, params, tokenizer, text: str, max_length: int) -> dict[str, Any]:
    """The greedy output for `text` and every attention layer's weights [heads, q, k] on it:
    {"source": tokens, "output": tokens, "maps": {layer name: weights}}."""
    from t2t_jax.decode import EOS_ID, decode_texts

    [output] = decode_texts(model, params, tokenizer, [text], model.config.type, max_length,
                            max_length, batch_size=1)
    source = tokenizer.encode(text)[: max_length - 1] + [EOS_ID]
    target = tokenizer.encode(output)[: max_length - 1] + [EOS_ID]
    inputs, targets = jnp.asarray([source]), jnp.asarray([target])
    _, state = model.apply({"params": params}, inputs=inputs, targets=targets,
                           mutable=["intermediates"])
    maps = {}
    for path, value in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        names = [str(getattr(p, "key", "")) for p in path]  # the tuple index has no key
        layer = "/".join(n for n in names
                         if n and n != "attention_weights" and not n.endswith("_block"))
        maps[layer] = np.asarray(value[0])  # sow keeps a tuple; [heads, q, k] of row 0
    symbols = lambda ids: [tokenizer.decode([i]) or ("</s>" if i == EOS_ID else "?")  # noqa: E731
                           for i in ids]
    return {"source": symbols(source), "output": symbols(target), "maps": maps}


def plot_attention(captured: dict[str, Any], path: str) -> str:
    """One row per attention layer, one column per head; axes labelled with the tokens."""
    plt = _plt()
    maps = captured["maps"]
    rows, cols = len(maps), max(m.shape[0] for m in maps.values())
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    order = sorted(maps, key=lambda n: ("decoder" in n, n))  # encoder first, then decoder
    for r, (name, weights) in enumerate((n, maps[n]) for n in order):
        q_labels = captured["source"] if "encoder" in name else captured["output"]
        k_labels = captured["source"] if ("encoder" in name or "cross" in name) \
            else captured["output"]
        for h in range(cols):
            ax = axes[r][h]
            ax.imshow(weights[h], cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks(range(len(k_labels)), k_labels, fontsize=6, rotation=90)
            ax.set_yticks(range(len(q_labels)), q_labels, fontsize=6)
            if h == 0:
                ax.set_ylabel(name.replace("/", "\n"), fontsize=6)
            if r == 0:
                ax.set_title(f"head {h}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attention_maps(output: str, smoke: bool, data_dir: str | None = None,
                   workdir: str | None = None, text: str = "3 1 4 1 5 9 2 6") -> dict[str, Any]:
    """Heat maps of encoder self-, decoder self- and cross-attention per head for `text`, from
    the checkpoint in `workdir` or from a reversal model trained here."""
    from t2t_jax.decode import load_translator

    if workdir is None:
        workdir = os.path.join(output, "runs", "attention_reverse")
        train_variant(task_config("reverse", smoke, 1500, data_dir), workdir)
    translator = load_translator(workdir)
    length = translator.config.data.max_source_length
    captured = capture_attention(translator.model, translator.params, translator.tokenizer,
                                 text, length)
    plot_attention(captured, os.path.join(output, "attention_maps.png"))
    # How sharply each layer attends: the mean of each query's largest weight, per head.
    sharpness = {k: [float(np.mean(np.max(m[h], axis=-1))) for h in range(m.shape[0])]
                 for k, m in captured["maps"].items()}
    return _write(output, "attention_maps", {
        "input": text, "source": captured["source"], "output": captured["output"],
        "mean_max_weight": sharpness,
    })


EXPERIMENTS: dict[str, Callable[..., dict[str, Any]]] = {
    "positional": positional,
    "scaling": scaling,
    "heads": heads,
    "attention_maps": attention_maps,
}


def run(name: str, output: str, smoke: bool = False, **options: Any) -> dict[str, Any]:
    """Runs experiment `name`, writing NAME.json and its plots under `output`; `options` go to
    the experiment (data_dir; workdir and text for attention_maps)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    os.makedirs(output, exist_ok=True)
    logging.info("experiment %s -> %s%s", name, output, " (smoke)" if smoke else "")
    return EXPERIMENTS[name](output, smoke, **options)
