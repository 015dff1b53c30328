"""The machine and the processes: accelerator data sheets and probes, XLA flags, the host's
allocator, TensorFlow on first use, and JAX's multi-process start."""
