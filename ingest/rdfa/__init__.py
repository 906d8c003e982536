"""Pure RDFA maths (shared/RDFA.md): tensors in, typed results out; no I/O, no printing."""
