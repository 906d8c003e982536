"""Issue 15, step 1: the exact QK decomposition of attention scores (ingest/rdfa/qk.py), checked
against TransformerLens's own hook_attn_scores (completeness) and, term by term, against autograd
through TransformerLens's forward pass with LN scales frozen (nothing here calls the code under test
to make its expected values)."""

from __future__ import annotations

import pytest
import torch
from frozen import frozen_forward
from tiny import random_saes, tiny_model

from ingest.rdfa.qk import qk_terms

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_model(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9))
    _, cache = model.run_with_cache(tokens)
    return model, tokens, cache


def components(cache, layer: int, b: int, pos: int) -> torch.Tensor:
    """[N, d] the pieces resid_pre of ``layer`` is the sum of at (b, pos): EMB, POS, then each earlier
    layer's attention output and MLP output (the attention-to-attention view's components)."""
    parts = [cache["hook_embed"][b, pos], cache["hook_pos_embed"][b, pos]]
    for l in range(layer):
        parts += [cache[f"blocks.{l}.hook_attn_out"][b, pos], cache[f"blocks.{l}.hook_mlp_out"][b, pos]]
    return torch.stack(parts)


def terms(model, cache, layer, b, t, s, query_parts, key_parts):
    attn = model.blocks[layer].attn
    scale = cache[f"blocks.{layer}.ln1.hook_scale"]
    return qk_terms(query_parts, key_parts, scale[b, t, 0], scale[b, s, 0], attn.W_Q.detach(), attn.W_K.detach(),
                    attn.b_Q.detach(), attn.b_K.detach(), attn.attn_scale)


@pytest.mark.parametrize("layer", [1, 2])
def test_terms_sum_to_the_models_attention_scores(setup, layer):
    model, tokens, cache = setup
    scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]  # [B, H, T, T]
    checked = 0
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            for s in range(t + 1):
                q, k = components(cache, layer, b, t), components(cache, layer, b, s)
                assert torch.allclose(q.sum(0), cache[f"blocks.{layer}.hook_resid_pre"][b, t], atol=1e-5)
                total = terms(model, cache, layer, b, t, s, q, k).total()
                assert torch.allclose(total, scores[b, :, t, s], rtol=RTOL, atol=ATOL), (b, t, s)
                checked += 1
    assert checked == 2 * 9 * 10 // 2


def test_terms_with_residual_sae_features_error_and_decoder_bias_sum_to_the_scores(setup):
    """Query and key sides split into the residual SAE's active features (activation x decoder row),
    its decoder bias and its error: the terms still add up to the score exactly."""
    model, tokens, cache = setup
    _, resid = random_saes(model)
    layer = 2
    sae = resid[layer]
    x = cache[f"blocks.{layer}.hook_resid_pre"]
    acts = sae.activation(sae.pre_activation(x))

    def sae_parts(b, pos):
        on = acts[b, pos].nonzero().flatten()
        feats = acts[b, pos, on, None] * sae.W_dec[on]
        error = x[b, pos] - sae.decode(acts[b, pos])
        return torch.cat([feats, sae.b_dec[None], error[None]])

    scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]
    for b, t, s in ((0, 8, 3), (1, 5, 5), (1, 7, 0)):
        q, k = sae_parts(b, t), sae_parts(b, s)
        assert len(q) > 3 and len(k) > 3  # several active features on each side
        total = terms(model, cache, layer, b, t, s, q, k).total()
        assert torch.allclose(total, scores[b, :, t, s], rtol=RTOL, atol=ATOL)


def test_each_term_equals_autograd_through_the_frozen_model(setup):
    """score(alpha, beta) with resid_pre at t = sum_i alpha_i c_i and at s = sum_j beta_j c_j, LN scales
    frozen, through TransformerLens: d2 score / d alpha_i d beta_j is pairs[i, j]; d score / d alpha_i
    at beta = 0 is query_bias[i]; d score / d beta_j at alpha = 0 is key_bias[j]; score(0, 0) is bias_bias."""
    model, tokens, cache = setup
    layer, b, t, s = 2, 1, 7, 2
    q_parts, k_parts = components(cache, layer, b, t), components(cache, layer, b, s)
    expected = terms(model, cache, layer, b, t, s, q_parts, k_parts)
    name = f"blocks.{layer}.hook_resid_pre"

    def scores(alpha, beta):
        resid = cache[name].detach().clone()
        resid = resid.index_put((torch.tensor([b]), torch.tensor([t])), (alpha @ q_parts)[None])
        resid = resid.index_put((torch.tensor([b]), torch.tensor([s])), (beta @ k_parts)[None])
        out = frozen_forward(model, tokens, cache, {name: resid}, [f"blocks.{layer}.attn.hook_attn_scores"])
        return out[f"blocks.{layer}.attn.hook_attn_scores"][b, :, t, s]  # [H]

    ones_q, ones_k = torch.ones(len(q_parts)), torch.ones(len(k_parts))
    for h in range(model.cfg.n_heads):
        alpha = ones_q.clone().requires_grad_(True)
        beta = ones_k.clone().requires_grad_(True)
        (d_beta,) = torch.autograd.grad(scores(alpha, beta)[h], beta, create_graph=True)
        mixed = torch.stack([torch.autograd.grad(d_beta[j], alpha, retain_graph=True)[0]
                             for j in range(len(k_parts))], dim=1)  # [Nq, Nk]
        assert torch.allclose(mixed, expected.pairs[h], rtol=RTOL, atol=ATOL)
        alpha = ones_q.clone().requires_grad_(True)
        (d_alpha,) = torch.autograd.grad(scores(alpha, torch.zeros_like(ones_k))[h], alpha)
        assert torch.allclose(d_alpha, expected.query_bias[h], rtol=RTOL, atol=ATOL)
        beta = ones_k.clone().requires_grad_(True)
        (d_beta0,) = torch.autograd.grad(scores(torch.zeros_like(ones_q), beta)[h], beta)
        assert torch.allclose(d_beta0, expected.key_bias[h], rtol=RTOL, atol=ATOL)
        with torch.no_grad():
            base = scores(torch.zeros_like(ones_q), torch.zeros_like(ones_k))[h]
        assert torch.allclose(base, expected.bias_bias[h], rtol=RTOL, atol=ATOL)
    # the marginals a q_in / k_in edge would carry add up to the score less the bias-bias term
    total = scores(ones_q, ones_k).detach()
    assert torch.allclose(expected.query_marginals().sum(1) + expected.key_bias.sum(1) + expected.bias_bias, total,
                          rtol=RTOL, atol=ATOL)
    assert torch.allclose(expected.key_marginals().sum(1) + expected.query_bias.sum(1) + expected.bias_bias, total,
                          rtol=RTOL, atol=ATOL)
