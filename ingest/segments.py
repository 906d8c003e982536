"""Sorts and segment reductions of int64-keyed columns, on the device that holds them.

The device reduction (``ingest.reduce``) is made of these: unique edge keys with their inverse,
per-head and per-role rows, the evidence order, sums and extrema per group. On CUDA, torch's own
kernels are the fast path (its sorts are radix sorts). On the CPU some of torch's are not: on the
2-core VM, torch.sort of 357k int64 keys took 15.5 ms where numpy 2's sort of the same keys
packed with their row numbers took 5 ms (catalog.lexsort), and scatter_reduce's amax 4.9 ms where
numpy's maximum.at took 1.5 ms. CPU tensors are handed to numpy without a copy.
"""

from __future__ import annotations

import numpy as np
import torch

from catalog.lexsort import lex_order
from catalog.lexsort import unique_inverse as np_unique_inverse

Key = tuple[torch.Tensor, int]  # an int64 column [n] of values in [0, 2^bits), and bits


def order_by(keys: list[Key]) -> torch.Tensor:
    """[n] int64 row order that sorts rows by keys[0], then keys[1], ...; equal rows keep their order.
    Every key column is int64 >= 0 and below 2^bits, all on one device."""
    n = len(keys[0][0])
    device = keys[0][0].device
    if n < 2:
        return torch.arange(n, device=device)
    if device.type != "cpu":
        return _torch_order(keys)
    return torch.from_numpy(lex_order([(k.detach().numpy(), b) for k, b in keys]))


def _torch_order(keys: list[Key]) -> torch.Tensor:
    """order_by in torch's own sorts (CUDA): least significant key first, as stable sorts compose."""
    order = torch.argsort(keys[-1][0], stable=True)
    for k, _ in reversed(keys[:-1]):
        order = order.index_select(0, torch.argsort(k.index_select(0, order), stable=True))
    return order


def unique_inverse(key: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What torch.unique(key, return_inverse=True) gives, by one stable sort: the sorted unique keys
    [m] and each row's place among them [n]. key: int64 [n] in [0, 2^bits)."""
    if key.device.type != "cpu":
        return _torch_unique_inverse(key, bits)
    uniq, inverse = np_unique_inverse(key.detach().numpy(), bits)
    return torch.from_numpy(uniq), torch.from_numpy(inverse)


def _torch_unique_inverse(key: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """unique_inverse in torch's own sorts (CUDA)."""
    order = _torch_order([(key, bits)]) if len(key) > 1 else torch.arange(len(key), device=key.device)
    s = key.index_select(0, order)
    first = torch.ones(len(s), dtype=torch.bool, device=key.device)
    first[1:] = s[1:] != s[:-1]
    inverse = torch.empty_like(order).scatter_(0, order, torch.cumsum(first, 0) - 1)
    return s[first], inverse


def dense_unique_inverse(code: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """unique_inverse of codes in [0, size) by marking them in a table of ``size`` flags instead of sorting:
    O(rows + size), for codes whose range is not much larger than their count (a GPT-2-shaped prompt's
    (edge, head) rows: 10 ms where the sort took 47 on the 2-core VM). code: int64 [n]."""
    seen = torch.zeros(size, dtype=torch.bool, device=code.device)
    seen[code] = True
    place = seen.cumsum(0) - 1  # each code's place among the distinct codes
    return seen.nonzero().squeeze(1), place.index_select(0, code)


def bits_of(x: torch.Tensor | int) -> int:
    """Bits that hold every value of a non-negative int64 column, or an int (at least 1)."""
    top = x if isinstance(x, int) else (int(x.max()) if len(x) else 0)
    return max(1, top.bit_length())


def segment_sum(group: torch.Tensor, x: torch.Tensor, m: int) -> torch.Tensor:
    """[m] the sum of ``x`` [n] over the rows of each group (group [n] in [0, m)): in row order on
    the CPU; CUDA's atomic adds take any order, so float sums may differ in their last bits
    (float64 here: 8e-16 relative on the H200, bench/cuda_vs_cpu.py)."""
    return torch.zeros(m, dtype=x.dtype, device=x.device).index_add_(0, group, x)


def segment_count(group: torch.Tensor, m: int) -> torch.Tensor:
    """[m] int64 rows per group."""
    return torch.bincount(group, minlength=m)


def segment_extreme(group: torch.Tensor, x: torch.Tensor, m: int, how: str) -> torch.Tensor:
    """[m] the min (``how`` "amin") or max ("amax") of ``x`` over each group; groups without rows get 0."""
    if x.device.type != "cpu":
        return _torch_extreme(group, x, m, how)
    values = x.detach().numpy()
    info = np.finfo(values.dtype) if values.dtype.kind == "f" else np.iinfo(values.dtype)
    ufunc, start = (np.minimum, info.max) if how == "amin" else (np.maximum, info.min)
    out = np.full(m, start, dtype=values.dtype)
    ufunc.at(out, group.numpy(), values)
    out[segment_count(group, m).numpy() == 0] = 0
    return torch.from_numpy(out)


def _torch_extreme(group: torch.Tensor, x: torch.Tensor, m: int, how: str) -> torch.Tensor:
    """segment_extreme in torch's own scatter (CUDA)."""
    return torch.zeros(m, dtype=x.dtype, device=x.device).scatter_reduce_(0, group, x, how, include_self=False)
