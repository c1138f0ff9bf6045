"""Pure-PyTorch references: the CPU fallback of every fast path and the oracle of its tests."""
