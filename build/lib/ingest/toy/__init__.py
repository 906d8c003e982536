"""The toy IOI kit: a small GPT-2-architecture model and its SAEs, trained on the CPU."""
