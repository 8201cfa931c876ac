"""Tensor parallelism: where this process sits in a replica (`topology`, torch-free), the process group and
its collectives (`group`), the per-rank weight slices (`shards`), and the worker processes (`workers`)."""
