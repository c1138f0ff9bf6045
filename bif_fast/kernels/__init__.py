"""Triton kernels and their launchers. Imported lazily: nothing here is loaded by ``import bif_fast``."""
