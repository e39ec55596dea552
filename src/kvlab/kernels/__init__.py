"""Triton GPU kernels (CUDA); the torch path in kvlab.attention is the reference."""
