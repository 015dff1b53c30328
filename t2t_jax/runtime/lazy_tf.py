"""TensorFlow, imported on first use.

TFDS, `prepare` and the helpers for gs:// files use TensorFlow, but training on prepared ids,
decoding, benchmarks and checkpoint restores on an accelerator machine without TensorFlow must
not need it just to import the modules that hold them.
"""

from __future__ import annotations

import importlib
from typing import Any


class _LazyModule:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)


tf: Any = _LazyModule("tensorflow")
