"""Positional roles of attention observations, computed on the device (vocabulary: catalog.schema.ROLES).

An attention observation reads source position s from destination position t through a head. Its
roles are what s is to t: relations of the tokens (duplicate, induction), of the positions
(previous, first), the offset t - s in buckets, and the pair of roles a prompt's meta names for the
two positions (IOI: ``io_pos``, ``s1_pos``, ``s2_pos``, ``end_pos``). One observation may have several
roles; every role it has counts once. The stores aggregate them per edge (count and sum of |value|).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from catalog.schema import OFFSETS, PROMPT_ROLES, RELATIONS, ROLES, Prompt

PAIR_BASE = len(RELATIONS) + len(OFFSETS)  # code of the first role pair
ROLE_SLOTS = 32  # per-role rows are keyed edge_key * ROLE_SLOTS + role code
assert len(ROLES) <= ROLE_SLOTS


@dataclass
class PromptPositions:
    """What roles need of a window's prompts, as tensors on the device."""

    token: torch.Tensor  # int64 [P, T] each prompt's tokens, numbered (equal token <=> equal number); -1 after the end
    role: torch.Tensor  # int64 [P, T] index into PROMPT_ROLES of the role at each position; -1 none

    @classmethod
    def of(cls, prompts: list[Prompt], device: torch.device | str) -> PromptPositions:
        width = max((len(p.tokens) for p in prompts), default=1) or 1
        token = np.full((len(prompts), width), -1, dtype=np.int64)
        role = np.full((len(prompts), width), -1, dtype=np.int64)
        numbers: dict[str, int] = {}
        for i, p in enumerate(prompts):
            token[i, :len(p.tokens)] = [numbers.setdefault(t, len(numbers)) for t in p.tokens]
            for r, name in enumerate(PROMPT_ROLES):
                pos = p.meta.get(f"{name.lower()}_pos")
                if isinstance(pos, int) and not isinstance(pos, bool) and 0 <= pos < len(p.tokens):
                    role[i, pos] = r
        return cls(torch.from_numpy(token).to(device), torch.from_numpy(role).to(device))


def role_rows(prompt: torch.Tensor, head: torch.Tensor, src_pos: torch.Tensor, dst_pos: torch.Tensor,
              positions: PromptPositions) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (observation row, role code) that holds, for the observations with a head (>= 0).

    prompt, head, src_pos, dst_pos: int64 [n] (``prompt`` indexes ``positions``' rows).
    Returns row int64 [k] and code int64 [k] (index into catalog.schema.ROLES), grouped by role."""
    rows = torch.nonzero(head >= 0).squeeze(1)
    p, s, t = prompt.index_select(0, rows), src_pos.index_select(0, rows), dst_pos.index_select(0, rows)
    width = positions.token.shape[1]
    at_s, at_t = p * width + s, p * width + t  # flat positions: index_select, not 2-D fancy indexing (3x here)
    token = positions.token.view(-1)
    tok_s, tok_t = token.index_select(0, at_s), token.index_select(0, at_t)
    tok_before_s = token.index_select(0, at_s - (s > 0).long())
    offset = t - s
    relations = [(s != t) & (tok_s == tok_t), (s > 0) & (tok_before_s == tok_t), offset == 1, s == 0]
    out_rows = [rows[m] for m in relations]
    out_codes = [torch.full_like(r, code) for code, r in enumerate(out_rows)]
    causal = offset >= 0  # attention reads earlier positions; hand-built data may not
    bucket = torch.where(offset < 4, offset, 4 + (offset >= 8).long() + (offset >= 16).long())
    out_rows.append(rows[causal])
    out_codes.append(len(RELATIONS) + bucket[causal])
    role = positions.role.view(-1)
    role_s, role_t = role.index_select(0, at_s), role.index_select(0, at_t)
    named = (role_s >= 0) & (role_t >= 0)
    out_rows.append(rows[named])
    out_codes.append(PAIR_BASE + role_s[named] * len(PROMPT_ROLES) + role_t[named])
    return torch.cat(out_rows), torch.cat(out_codes)
