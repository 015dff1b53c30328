"""Measuring and compiling ahead of time: benchmarks of the step and the input, profiles, HLO
reading, attention kernel checks, and compiles for TPU topologies and GPU hosts not present."""
