r"""Cost benchmark: parameters, FLOPs, throughput and memory of SMoPE.

    python -m smope_jax.benchmark --config=configs/imagenet_r.py:tasks=10 \
        --batch=16 --out=/tmp/benchmark.json

See docs/benchmark.md for the rows and columns.
"""
