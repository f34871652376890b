"""Flat-buffer primitives of the SARE step: gradient sum of squares, perturb and restore.

`kernels.reference` is the torch implementation (foreach ops), used on every device and
the reference the fused Triton kernels are tested against.
"""
from kernels.reference import perturb_, restore_, sum_of_squares

__all__ = ["perturb_", "restore_", "sum_of_squares"]
