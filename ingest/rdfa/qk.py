"""Exact QK attribution: why a head attended from query position t to key position s.

With LN1's scale frozen at its value on the prompt, LN1 is linear (processed weights: center, then
divide by the position's scale), so the pre-softmax score of head h

    score[h, t, s] = (LN1(x_t) W_Q[h] + b_Q[h]) . (LN1(x_s) W_K[h] + b_K[h]) / attn_scale

is bilinear in the two residual streams. Split each stream into components that sum to it (residual
SAE features, error and decoder bias; or, in the attention-to-attention view, EMB, POS, each earlier
attention feature through W_O, error, bias and MLP output) and the score is exactly

    sum_ij pairs[h, i, j] + sum_i query_bias[h, i] + sum_j key_bias[h, j] + bias_bias[h]

with pairs[h, i, j] = q_i . k_j / attn_scale (q_i = center(c_i) / scale_t @ W_Q[h], k_j likewise at
s), query_bias = q_i . b_K, key_bias = b_Q . k_j and bias_bias = b_Q . b_K (each / attn_scale). Units:
attention-score logits (before softmax), not feature pre-activations. Pure tensors in and out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ingest.rdfa.steps import center


@dataclass
class QKTerms:
    """The exact decomposition of H heads' scores from one query position to one key position."""

    pairs: torch.Tensor  # [H, Nq, Nk] query-side component i x key-side component j
    query_bias: torch.Tensor  # [H, Nq] query-side component i x the key bias
    key_bias: torch.Tensor  # [H, Nk] the query bias x key-side component j
    bias_bias: torch.Tensor  # [H] the query bias x the key bias

    def total(self) -> torch.Tensor:
        """[H] the scores the terms add up to."""
        return self.pairs.sum((1, 2)) + self.query_bias.sum(1) + self.key_bias.sum(1) + self.bias_bias

    def query_marginals(self) -> torch.Tensor:
        """[H, Nq] each query-side component's share: its pairs with every key-side component plus its
        term with the key bias (what a ``q_in`` edge into the head carries)."""
        return self.pairs.sum(2) + self.query_bias

    def key_marginals(self) -> torch.Tensor:
        """[H, Nk] each key-side component's share (what a ``k_in`` edge carries)."""
        return self.pairs.sum(1) + self.key_bias


def qk_terms(query_parts: torch.Tensor, key_parts: torch.Tensor, query_scale: torch.Tensor,
             key_scale: torch.Tensor, W_Q: torch.Tensor, W_K: torch.Tensor, b_Q: torch.Tensor, b_K: torch.Tensor,
             attn_scale: float) -> QKTerms:
    """Decompose the scores of every head of a layer from query position t to key position s.

    query_parts [Nq, d]: components summing to the residual stream (resid_pre of the layer) at t;
    key_parts [Nk, d]: the same at s; query_scale, key_scale: LN1's scale at t and s (scalars, frozen);
    W_Q, W_K [H, d, dh], b_Q, b_K [H, dh]: the layer's processed weights (LN1 folded in);
    attn_scale: the score's divisor (sqrt(d_head) in GPT-2)."""
    q = torch.einsum("id,hde->hie", center(query_parts) / query_scale, W_Q)  # [H, Nq, dh]
    k = torch.einsum("jd,hde->hje", center(key_parts) / key_scale, W_K)  # [H, Nk, dh]
    return QKTerms(pairs=torch.einsum("hie,hje->hij", q, k) / attn_scale,
                   query_bias=torch.einsum("hie,he->hi", q, b_K) / attn_scale,
                   key_bias=torch.einsum("he,hje->hj", b_Q, k) / attn_scale,
                   bias_bias=(b_Q * b_K).sum(-1) / attn_scale)
