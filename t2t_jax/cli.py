"""`t2t-jax`: one command line, thin subcommands over the library.

  t2t-jax train --config configs/reverse.py --workdir DIR [--config.model.num_heads=4 ...]
  t2t-jax prepare --config configs/wmt14_ende_base.py --workdir DIR
  t2t-jax info  --config configs/base.py
"""

from __future__ import annotations

import os
import sys

# Quiet TensorFlow's C++ start-up chatter; TF serves only the input pipeline here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py); override fields with --config.a.b=value."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")

USAGE = """usage: t2t-jax COMMAND --config FILE [--config.key=value ...] [--workdir DIR]

commands:
  train   train (or resume) in --workdir on --config
  prepare download and prepare --config's datasets and train its tokenizer into --workdir
  info    parameters per module, mesh, batch and memory estimate of --config
  bench-input  input pipeline examples/s and tokens/s next to the train step's consumption
               (on a generated WMT-like corpus when --config is parallel_text without files)
"""


def _hide_gpus_from_tensorflow() -> None:
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")


def _require(value, flag: str):
    if value is None:
        raise app.UsageError(f"--{flag} is required")
    return value


def train_command() -> None:
    from t2t_jax.train import train_and_evaluate

    config = _require(_CONFIG.value, "config")
    workdir = _require(_WORKDIR.value, "workdir")
    result = train_and_evaluate(config, workdir)
    print(f"workdir: {os.path.abspath(workdir)}")
    for key in ("loss", "accuracy", "eval_loss", "eval_accuracy", "test_loss", "test_accuracy"):
        if key in result:
            print(f"{key:>15s}: {result[key]:.4f}")
    if "bleu" in result:
        print(f"{'bleu':>15s}: {result['bleu']:.2f} ({result['bleu_signature']})")
    for source, target, output in result.get("samples", []):
        mark = "ok " if output == target else "BAD"
        print(f"[{mark}] {source}\n      -> {output}\n      (target {target})")


def prepare_command() -> None:
    from t2t_jax.data import tasks

    config = _require(_CONFIG.value, "config")
    workdir = _require(_WORKDIR.value, "workdir")
    builder = tasks.builder_from_config(config.data, prepare=True)
    test_builder = tasks.builder_from_config(config.data, split="test", prepare=True)
    tokenizer = tasks.tokenizer_from_config(config.data, workdir, builder)
    tokenizer.save(workdir)
    for name, b in (("data", builder), ("test data", test_builder)):
        splits = ", ".join(f"{k} {v.num_examples:,d}" for k, v in b.info.splits.items())
        print(f"{name}: {b.data_dir} ({splits})")
    print(f"tokenizer: {tokenizer.vocab_size} ids, saved in {os.path.abspath(workdir)}")


_PAIRS = flags.DEFINE_integer("pairs", 100_000, "bench-input: generated sentence pairs.")
_BATCHES = flags.DEFINE_integer("batches", 50, "bench-input: pipeline batches to time.")
_STEPS = flags.DEFINE_integer("steps", 3, "bench-input: train steps to time.")


def bench_input_command() -> None:
    from t2t_jax import input_bench

    config = _require(_CONFIG.value, "config")
    workdir = _require(_WORKDIR.value, "workdir")
    if config.data.task == "parallel_text" and not config.data.train_source:
        print(f"generating {_PAIRS.value:,d} WMT-like sentence pairs in {workdir}/corpus")
        files = input_bench.synthetic_corpus(os.path.join(workdir, "corpus"), _PAIRS.value)
        config.data.update(files)
    for what, figures in input_bench.run(config, workdir, _BATCHES.value, _STEPS.value):
        shown = ", ".join(f"{k} {v:,.1f}" for k, v in figures.items())
        print(f"{what:<28s} {shown}")


def info_command() -> None:
    from t2t_jax.info import describe

    print("\n".join(describe(_require(_CONFIG.value, "config"))))


COMMANDS = {
    "train": train_command,
    "prepare": prepare_command,
    "info": info_command,
    "bench-input": bench_input_command,
}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        extra = " ".join(argv[1:]) or "nothing"
        raise app.UsageError(f"expected one command, got {extra!r}\n{USAGE}")
    _hide_gpus_from_tensorflow()
    logging.set_verbosity(logging.WARNING)
    try:
        COMMANDS[argv[1]]()
    except (ValueError, FileNotFoundError) as error:
        # Configuration and input mistakes: one line naming the fix, no stack trace.
        print(f"t2t-jax {argv[1]}: error: {error}", file=sys.stderr)
        sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config errors (unknown key, bad value) as one line."""
    try:
        remaining = FLAGS(argv)
        if _CONFIG.value is not None:
            dict(_CONFIG.value)  # a config file that failed to load raises only when read
        return remaining
    except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        message = " ".join(lines[-2:]) if isinstance(error, OSError) else lines[-1]
        if isinstance(error, (AttributeError, KeyError)):
            message = _unknown_key_message(argv, message)
        print(f"t2t-jax: error: {message}", file=sys.stderr)
        sys.exit(2)


def _unknown_key_message(argv: list[str], message: str) -> str:
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].split("=")[0]
            if f"'{key.split('.')[-1]}'" in message:
                return (
                    f"unknown config key {key!r} in {arg}; check the spelling against the "
                    "fields of t2t_jax/config.py"
                )
    return message


def run() -> None:
    """Console entry point."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
