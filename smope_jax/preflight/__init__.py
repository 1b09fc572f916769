"""Ahead-of-time compilation of a run for TPU slices and NVIDIA GPUs.

`python -m smope_jax.preflight --config=CFG --target=tpu:v5e-8` tells, from
a workstation, whether every step of the run compiles and fits the target's
memory, and how fast its chips could at best run it.
"""
