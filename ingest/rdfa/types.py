"""Plain tensor containers the RDFA maths works on (no SAELens, no I/O)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from catalog.ids import NodeKind


@dataclass
class SaeWeights:
    """One SAE as the maths needs it.

    Shapes: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
    For hook_z SAEs d_in = n_heads * d_head (z flattened head-major, as SAELens reshapes it). A transcoder
    reads LN2's output and decodes into the MLP's output: d_in = d_out = d_model, and b_dec [d_out] is an
    output bias only (SAELens refuses apply_b_dec_to_input for transcoders).
    Pre-activation: (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc. Activation: ReLU, or
    JumpReLU when ``threshold`` [d_sae] is set, or TopK (over ReLU'd pre-activations) when ``top_k``.
    """

    kind: NodeKind  # ATTN (hook_z), RESID (hook_resid_pre) or TRANSCODER (ln2.hook_normalized -> hook_mlp_out)
    layer: int
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    apply_b_dec_to_input: bool = True
    threshold: torch.Tensor | None = None
    top_k: int | None = None
    _encoder_constant: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _through: dict[str, tuple[tuple, torch.Tensor]] = field(default_factory=dict, init=False, repr=False,
                                                           compare=False)

    def __post_init__(self) -> None:
        # column-major (W_enc.T contiguous): RDFA reads the encoder column of every active feature, and
        # a gather of rows is ~20x faster than one of strided columns (7 ms a GPT-2 layer per prompt);
        # the encode's matmul runs as fast on either layout
        self.W_enc = self.W_enc.T.contiguous().T

    def encoder_columns(self, index: torch.Tensor) -> torch.Tensor:
        """W_enc[:, index].T: the encoder vectors of features ``index`` [...] as [..., d_in]."""
        return self.W_enc.T.index_select(0, index.flatten()).view(*index.shape, -1)

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def input_offset(self) -> torch.Tensor:
        """The vector subtracted from the input before W_enc: [d_in]."""
        return self.b_dec if self.apply_b_dec_to_input else torch.zeros_like(self.b_dec)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae]."""
        return (x - self.input_offset) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] pre-activations -> feature activations."""
        if self.threshold is not None:
            return pre * (pre > self.threshold)
        acts = torch.relu(pre)
        if self.top_k is not None:
            vals, idx = acts.topk(self.top_k, dim=-1)
            acts = torch.zeros_like(acts).scatter_(-1, idx, vals)
        return acts

    def fires(self, pre: torch.Tensor) -> torch.Tensor | None:
        """Where :meth:`activation` of ``pre`` [..., d_sae] is nonzero, as a bool tensor, for the SAEs whose
        activation there equals the pre-activation (ReLU, JumpReLU): without building the activations (two
        passes over [B, T, d_sae] at GPT-2 width). None for a top-k SAE."""
        if self.top_k is not None:
            return None
        if self.threshold is None:
            return pre > 0
        return (pre > self.threshold) & (pre != 0)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] -> [..., d_in]."""
        return acts @ self.W_dec + self.b_dec

    def encoder_constant(self) -> torch.Tensor:
        """The input-independent part of every pre-activation: b_enc - offset @ W_enc, [d_sae].
        Computed once (a d_in x d_sae product every batch would cost as much as a small step)."""
        if self._encoder_constant is None:
            self._encoder_constant = self.b_enc - self.input_offset @ self.W_enc
        return self._encoder_constant

    def decoder_through(self, name: str, source: tuple[torch.Tensor, ...], prepare: Callable[[], torch.Tensor]
                        ) -> torch.Tensor:
        """W_dec @ prepare() [d_sae, n], kept under ``name`` while ``source`` (the weights prepare() reads) is
        the same. A feature's row times a fixed matrix is its activation times a row of this, so every batch
        reads it: an attention SAE's decoder rows through W_O (K x d_in x d_model products per position cost
        more than one d_sae x d_in x d_model product per run), a residual SAE's through W_V, W_Q and W_K.
        75 MB a GPT-2 layer per 768 columns in float32. Built at the first request, never later: a batch's
        values must not depend on what ran before it (a resumed or sharded job gives the same catalog)."""
        return self.cached(name, source, lambda: self.W_dec @ prepare())

    def cached(self, name: str, source: tuple[torch.Tensor, ...], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """compute(), a function of this SAE and the weights ``source`` alone, kept under ``name`` while they are
        the same (see :meth:`decoder_through`)."""
        key = tuple(_identity(w) for w in source)
        hit = self._through.get(name)
        if hit is None or hit[0] != key:
            hit = self._through[name] = (key, compute())
        return hit[1]

    def to(self, device) -> SaeWeights:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SaeWeights(self.kind, self.layer, move(self.W_enc), move(self.b_enc), move(self.W_dec),
                          move(self.b_dec), self.apply_b_dec_to_input, move(self.threshold), self.top_k)


def _identity(W: torch.Tensor) -> tuple:
    """What a cached product of W is keyed by: its storage, shape, device, dtype and in-place version."""
    return W.data_ptr(), tuple(W.shape), W.device, W.dtype, W._version
