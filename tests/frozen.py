"""An independent reference for RDFA: gradient x input through TransformerLens's own forward pass.

Attention patterns and LN scales are replaced by their cached (detached) values; the chosen
upstream activations are replaced by leaf tensors, so autograd sees exactly the linear direct
paths RDFA decomposes. Nothing here calls the code under test.
"""

from __future__ import annotations

import torch


def frozen_forward(model, tokens, cache, replacements: dict, capture_names: list[str]):
    """Run with patterns and LN scales frozen and ``replacements`` {hook name: tensor} spliced in.

    Returns {name: activation} for ``capture_names`` (kept in the autograd graph).
    """
    captured = {}
    hooks = []
    for name in cache:
        if name.endswith(("hook_pattern", "hook_scale")):
            hooks.append((name, lambda act, hook, v=cache[name]: v.detach()))
    for name, value in replacements.items():
        hooks.append((name, lambda act, hook, v=value: v))
    for name in capture_names:
        def keep(act, hook, name=name):
            captured[name] = act
            return act
        hooks.append((name, keep))
    model.run_with_hooks(tokens, fwd_hooks=hooks)
    return captured


def grad_x_input(output: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: leaf * d output / d leaf} for a scalar ``output``."""
    names = list(leaves)
    grads = torch.autograd.grad(output, [leaves[n] for n in names], retain_graph=True, allow_unused=True)
    return {n: (leaves[n].detach() * g if g is not None else torch.zeros_like(leaves[n]).detach())
            for n, g in zip(names, grads)}
