"""Pure RDFA maths (docs/rdfa.md): tensors in, typed results out; no I/O, no printing."""
