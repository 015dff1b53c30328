"""The attention maps experiment, and `t2t-jax attention` on any checkpoint: each layer's and
head's attention weights for one input, captured from the model and drawn as heat maps."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2t_jax.guide.runs import plt_module, task_config, train_variant, write_results


def capture_attention(decoder, text: str) -> dict[str, Any]:
    """The greedy output for `text` (through the decoding path) and every attention layer's
    weights [heads, q, k] on it: {"source": tokens, "output": tokens, "maps": {layer: weights}}."""
    from t2t_jax.decode import EOS_ID, DecodeOptions, Search, translate

    model, params, tokenizer = decoder.model, decoder.params[0], decoder.tokenizer
    max_length = decoder.config.data.max_source_length
    options = DecodeOptions(Search(beam_size=1), batch_size=1, max_output_length=max_length)
    [[best]] = translate(decoder, [text], options)[0]
    source = tokenizer.encode(text)[: max_length - 1] + [EOS_ID]
    target = best.ids[: max_length - 1] + [EOS_ID]
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
    plt = plt_module()
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
    from t2t_jax.decode import load_decoder

    os.makedirs(output, exist_ok=True)
    if workdir is None:
        workdir = os.path.join(output, "runs", "attention_reverse")
        train_variant(task_config("reverse", smoke, 1500, data_dir), workdir)
    captured = capture_attention(load_decoder(workdir), text)
    plot_attention(captured, os.path.join(output, "attention_maps.png"))
    # How sharply each layer attends: the mean of each query's largest weight, per head.
    sharpness = {k: [float(np.mean(np.max(m[h], axis=-1))) for h in range(m.shape[0])]
                 for k, m in captured["maps"].items()}
    return write_results(output, "attention_maps", {
        "input": text, "source": captured["source"], "output": captured["output"],
        "mean_max_weight": sharpness,
    })
