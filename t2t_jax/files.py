"""File operations on local paths and URLs (gs://...): the standard library for local paths,
`tf.io.gfile` for URLs, so that a run on local disks needs no TensorFlow."""

from __future__ import annotations

import os
import shutil
from typing import IO

from t2t_jax.runtime.lazy_tf import tf


def is_url(path: str) -> bool:
    return "://" in path


def exists(path: str) -> bool:
    return tf.io.gfile.exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return tf.io.gfile.isdir(path) if is_url(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
    if is_url(path):
        tf.io.gfile.makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Entry names, without the trailing slash gfile gives directories."""
    names = tf.io.gfile.listdir(path) if is_url(path) else os.listdir(path)
    return [name.rstrip("/") for name in names]


def rmtree(path: str) -> None:
    if is_url(path):
        tf.io.gfile.rmtree(path)
    else:
        shutil.rmtree(path)


def rename(source: str, destination: str, overwrite: bool = False) -> None:
    if is_url(source):
        tf.io.gfile.rename(source, destination, overwrite=overwrite)
    elif overwrite:
        os.replace(source, destination)
    else:
        os.rename(source, destination)


def stat(path: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns)."""
    if is_url(path):
        info = tf.io.gfile.stat(path)
        return int(info.length), int(info.mtime_nsec)
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def open_file(path: str, mode: str = "r") -> IO:
    if is_url(path):
        return tf.io.gfile.GFile(path, mode)
    return open(path, mode)  # noqa: SIM115 - the caller closes it
