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


def edge_dict(table, kind):
    """{(every column but value and kind): value} of the edges of ``kind`` in an EdgeTable; refuses duplicates."""
    out = {}
    for i in torch.nonzero(table.kind == kind).flatten().tolist():
        key = tuple(int(getattr(table, c)[i]) for c in table.COLUMNS if c not in ("value", "kind"))
        assert key not in out, f"duplicate edge {key}"
        out[key] = float(table.value[i])
    return out


def leaf(x):
    """A detached copy of ``x`` that autograd tracks: a source whose grad x input is read."""
    return x.detach().clone().requires_grad_(True)


def attn_leaves(model, attn, cache, layers):
    """hook_z of each layer in ``layers`` rebuilt from leaf feature activations, error and b_dec."""
    leaves, repl = {}, {}
    for l in layers:
        sae = attn[l]
        z = cache[f"blocks.{l}.attn.hook_z"]
        acts = sae.activation(sae.pre_activation(z.flatten(-2)))
        err = z.flatten(-2) - sae.decode(acts)
        leaves[f"a{l}"], leaves[f"ea{l}"], leaves[f"ba{l}"] = leaf(acts), leaf(err), leaf(sae.b_dec)
        leaves[f"bo{l}"] = leaf(model.blocks[l].attn.b_O)
        repl[f"blocks.{l}.attn.hook_z"] = (leaves[f"a{l}"] @ sae.W_dec + leaves[f"ba{l}"] + leaves[f"ea{l}"]).view_as(z)
    return leaves, repl


def with_b_o(model, leaves, repl, layers, fn):
    """Run ``fn`` with each layer's b_O swapped for its leaf so its grad x input is measurable."""
    saved = {l: model.blocks[l].attn.b_O for l in layers}
    try:
        for l in layers:
            model.blocks[l].attn.b_O = torch.nn.Parameter(leaves[f"bo{l}"], requires_grad=True)
            leaves[f"bo{l}"] = model.blocks[l].attn.b_O
        return fn()
    finally:
        for l, p in saved.items():
            model.blocks[l].attn.b_O = p
