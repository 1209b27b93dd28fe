"""Fused kernels for DP training and their pure-torch references.

Each op lives in one file (``per_sample_norm``, ``clipped_grad``, ``noisy_update``) holding the
torch reference (the CPU path and the test oracle) next to the Triton kernel. ``dispatch``
decides per call which one runs (see docs/architecture.md, "Kernels and dispatch").
"""
