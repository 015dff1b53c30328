"""What several commands share: the config file and its overrides, the workdir, typed lists, and
the checks that turn a mistake on the command line into one line of text."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import Any


class CommandLineError(ValueError):
    """A mistake in what the user typed: shown as one line, exit status 2."""


def typed_list(kind: type, name: str) -> Callable[[str], list]:
    """An argparse type for comma-separated values of `kind` ("128,256" -> [128, 256])."""

    def parse(text: str) -> list:
        try:
            return [kind(value) for value in text.split(",") if value.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {name} separated by commas, got {text!r}") from None

    parse.__name__ = f"{kind.__name__} list"
    return parse


INTS = typed_list(int, "integers")
FLOATS = typed_list(float, "numbers")


def names(text: str) -> list[str]:
    """Comma-separated names ("xla,cudnn")."""
    return [value.strip() for value in text.split(",") if value.strip()]


def add_config(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--config", metavar="FILE[:ARG]", required=required,
        help="config file (configs/*.py, an optional :ARG picks a preset); change any field "
             "with --config.a.b=value (the fields: t2t_jax/config.py)")


def add_workdir(parser: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    parser.add_argument("--workdir", metavar="DIR", required=required, help=what)


def split_overrides(extra: list[str]) -> tuple[list[str], list[str]]:
    """(--config.a.b=value overrides, anything else) of what argparse did not know; an
    override's value may also follow it as the next word."""
    overrides, unknown = [], []
    words = iter(extra)
    for word in words:
        if not word.startswith("--config."):
            unknown.append(word)
        elif "=" in word:
            overrides.append(word)
        else:
            value = next(words, None)
            if value is None:
                raise CommandLineError(f"{word} needs a value: {word}=VALUE")
            overrides.append(f"{word}={value}")
    return overrides, unknown


def load_config(path: str, overrides: list[str]) -> Any:
    """The ml_collections config of `path` with `overrides` applied, as `config_flags` reads
    them; every mistake (no file, a failing config, an unknown key, a bad value, a retired key)
    is a CommandLineError of one line."""
    from absl import flags
    from ml_collections import config_flags

    from t2t_jax.config import RETIRED_KEYS

    for override in overrides:
        key = override[len("--config."):].split("=", 1)[0]
        if key in RETIRED_KEYS:
            raise CommandLineError(f"{key} was retired: {RETIRED_KEYS[key]}")
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    try:
        values(["t2t-jax", f"--config={path}", *overrides])
        config = holder.value
        dict(config)  # a config file that failed to load raises only when read
        return config
    except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as error:
        raise CommandLineError(_config_error_text(error, overrides)) from None


def _config_error_text(error: Exception, overrides: list[str]) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    message = " ".join(lines[-2:]) if isinstance(error, OSError) else (lines[-1] if lines else "")
    if isinstance(error, (AttributeError, KeyError)) or "Did you mean" in text:
        for override in overrides:
            key = override[len("--config."):].split("=", 1)[0]
            leaf = key.split(".")[-1]
            if re.search(rf"['\"]{re.escape(leaf)}['\"]", text):
                suggestion = re.search(r'Did you mean "(\w+)"', text)
                hint = (f"did you mean {'.'.join([*key.split('.')[:-1], suggestion.group(1)])}?"
                        if suggestion else
                        "check the spelling against the fields of t2t_jax/config.py")
                return f"unknown config key {key!r} in {override}; {hint}"
    return message


def read_lines(path: str, flag: str) -> list[str]:
    """The lines of `path` (- for stdin), without their line ends."""
    import os

    if path == "-":
        return [line.rstrip("\r\n") for line in sys.stdin]
    if not os.path.exists(path):
        raise FileNotFoundError(f"--{flag} {path}: no such file")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def one(values: list, flag: str) -> Any:
    """The single value of a list flag that sweeps only in some commands."""
    if len(values) != 1:
        raise CommandLineError(f"--{flag} takes one value here (a list sweeps only in evaluate)")
    return values[0]


def device_summary() -> str:
    import jax

    return f"{jax.device_count()} x {jax.devices()[0].device_kind} (jax {jax.__version__})"
