"""`t2t-jax`: one command line, thin subcommands over the library.

  t2t-jax --help                      the commands
  t2t-jax COMMAND --help              that command's flags, with their defaults
  t2t-jax train --config configs/reverse.py --workdir DIR [--config.model.num_heads=4 ...]

Each command's flags are its own (`train.py`, `decode.py`, `perf.py` here). Only `run`, the
console entry point, changes the process's environment, before JAX starts: the accelerator
probes, the project's XLA flags, TensorFlow's quiet start and glibc's huge pages; importing
this package changes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

from t2t_jax.cli import decode, perf, serve, train
from t2t_jax.cli.args import CommandLineError, load_config, split_overrides

PROGRAM = "t2t-jax"
EXAMPLES = """examples:
  t2t-jax train --config configs/reverse.py --workdir runs/reverse
  echo "3 1 4" | t2t-jax decode --workdir runs/reverse
  t2t-jax bench --config configs/base.py --seq_lens 256,512
  t2t-jax compile --config configs/base.py --topology v5e:4x4
  t2t-jax serve --workdir runs/reverse --port 8080

A config's fields change with --config.a.b=value (every field: t2t_jax/config.py)."""


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's default after its help (where it has one); descriptions wrapped, and text
    laid out in lines (the examples) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if shown and action.option_strings and "default" not in (action.help or ""):
            value = action.default
            value = ",".join(map(str, value)) if isinstance(value, list) else value
            return f"{action.help} (default: {value})"
        return action.help or ""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """The top-level parser and each command's, all with `_HelpFormatter`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subparser a command, each with its own flags."""
    parser = _Parser(
        prog=PROGRAM, epilog=EXAMPLES,
        description="The Transformer of 'Attention Is All You Need' in JAX: train, decode, "
                    "evaluate, benchmark and compile ahead of time.")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND",
                                     parser_class=_Parser)
    commands.required = True
    train.add_commands(commands)
    decode.add_commands(commands)
    perf.add_commands(commands)
    serve.add_commands(commands)
    parser.command_parsers = commands.choices
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The command and its flags, the config loaded with its overrides; a mistake exits 2 with
    one line naming it."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    subparser = parser.command_parsers[args.command]
    try:
        overrides, unknown = split_overrides(extra)
    except CommandLineError as error:
        subparser.error(str(error))
    if unknown:
        subparser.error(f"unrecognized arguments: {' '.join(unknown)} (see t2t-jax "
                        f"{args.command} --help)")
    if overrides and getattr(args, "config", None) is None:
        subparser.error(f"{overrides[0]} changes a config, and {args.command} takes none")
    if getattr(args, "config", None) is not None:
        try:
            args.config = load_config(args.config, overrides)
        except CommandLineError as error:
            print(f"{PROGRAM} {args.command}: error: {error}", file=sys.stderr)
            sys.exit(2)
    return args


def main(argv: list[str]) -> int:
    """Runs one command; returns the exit status (2: a mistake in the input, 3: a diverged
    run). Other exceptions are bugs and keep their traceback."""
    args = parse(argv)
    _hide_gpus_from_tensorflow()
    _quiet_logging()
    try:
        args.run(args)
    except Exception as error:
        code = _error_code(error)
        if code:  # a mistake in the config or input, or a diverged run: one line
            print(f"{PROGRAM} {args.command}: error: {error}", file=sys.stderr)
            _exit(code)
        if not _is_multiprocess():
            raise
        import traceback

        traceback.print_exc()
        _exit(1)
    return 0


def set_up_process() -> None:
    """What the command line's process sets before JAX or TensorFlow start: quiet TensorFlow,
    the accelerator probes' environment, and the project's default XLA flags."""
    from t2t_jax.runtime.accelerator_probe import quiet_without_accelerators
    from t2t_jax.runtime.xla_flags import with_default_xla_flags

    # TF serves only TFDS, `prepare` and gs:// files here: its C++ start-up chatter is noise.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    quiet_without_accelerators()
    os.environ["XLA_FLAGS"] = with_default_xla_flags(os.environ.get("XLA_FLAGS", ""))


def run() -> None:
    """Console entry point."""
    from t2t_jax.runtime import host_allocator

    host_allocator.restart_with_huge_pages()  # returns where the restart would change nothing
    set_up_process()
    sys.exit(main(sys.argv[1:]))


def _quiet_logging() -> None:
    from absl import logging

    logging.set_verbosity(logging.WARNING)


def _hide_gpus_from_tensorflow() -> None:
    """TensorFlow (TFDS, preparing ids, gs:// files) must leave the GPUs to JAX."""
    try:
        import tensorflow as tf
    except ImportError:  # the model-only commands (bench, check-attention) run without it
        return

    tf.config.set_visible_devices([], "GPU")


def _error_code(error: Exception) -> int:
    """2 for configuration and input mistakes, 3 for a run that diverged, 0 for a bug."""
    if isinstance(error, (ValueError, FileNotFoundError)):
        return 2
    from t2t_jax.train import TrainingDiverged

    return 3 if isinstance(error, TrainingDiverged) else 0


def _is_multiprocess() -> bool:
    import jax

    return jax.process_count() > 1


def _exit(code: int) -> None:
    """Exits now. In a multi-process run, without JAX's shutdown barrier: the other processes
    will never reach it, and waiting for them would hang this one instead of failing it."""
    if _is_multiprocess():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
