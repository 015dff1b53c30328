"""Exports of a trained model to other runtimes: CTranslate2 (`ctranslate2_spec.py`) and the
engine that decodes its exports (`ctranslate2_engine.py`)."""
