"""Benchmark configs: one get_config(arg) per benchmark; see README."""
