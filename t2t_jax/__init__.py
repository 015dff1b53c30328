"""t2t_jax: the Transformer of "Attention Is All You Need" in JAX and Flax."""

from t2t_jax.runtime.accelerator_probe import quiet_without_accelerators

__version__ = "0.1.0"

# Before JAX starts its backends, which happens on first use, not on import.
quiet_without_accelerators()
