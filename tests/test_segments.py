"""The sorts and segment reductions under the device reduction (catalog.lexsort, ingest.segments)
against numpy's own lexsort, torch.unique and plain Python: every key width, ties at every key, keys
wider than the packed prefix (ordered again among tied rows), and the torch paths CUDA takes (run
here on CPU tensors: no GPU in CI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catalog.lexsort import lex_order
from ingest.segments import (
    _torch_extreme,
    _torch_order,
    _torch_unique_inverse,
    order_by,
    segment_extreme,
    unique_inverse,
)


def _random_keys(rng, n: int) -> list[tuple[np.ndarray, int]]:
    keys = []
    for _ in range(int(rng.integers(1, 4))):
        bits = int(rng.integers(1, 64))
        pool = rng.integers(0, 2 ** min(bits, 62), int(rng.integers(1, 40)), dtype=np.int64)
        if bits > 62:  # values that use the top bit of a 63-bit key
            pool |= np.int64(1) << 62
        keys.append((pool[rng.integers(0, len(pool), n)], bits))
    return keys


@pytest.mark.parametrize("seed", range(4))
def test_lex_order_is_a_stable_lexsort_of_every_key_width(seed):
    rng = np.random.default_rng(seed)
    for _ in range(100):
        n = int(rng.integers(0, 2000))
        keys = _random_keys(rng, n)
        want = np.lexsort([k for k, _ in reversed(keys)]) if n else np.zeros(0, np.int64)
        assert lex_order(keys).tolist() == want.tolist()  # equal rows keep their order: indices must match
        t_keys = [(torch.from_numpy(k), b) for k, b in keys]
        assert order_by(t_keys).tolist() == want.tolist()
        if n:
            assert _torch_order(t_keys).tolist() == want.tolist()


def test_values_that_differ_only_past_the_packed_prefix_are_still_ordered():
    """Two 62-bit keys leave the second one's low bits out of the prefix; equal prefixes are ordered
    again by them."""
    first = np.full(6, 5, np.int64)
    second = np.array([7, 3, 6, 1, 2, 0], np.int64) + (np.int64(1) << 61)
    assert lex_order([(first, 62), (second, 62)]).tolist() == [5, 3, 4, 1, 2, 0]


@pytest.mark.parametrize("unique", [unique_inverse, _torch_unique_inverse], ids=["numpy", "torch"])
def test_unique_inverse_is_torch_unique(unique):
    rng = np.random.default_rng(3)
    for n, bits in ((0, 6), (1, 6), (2, 6), (500, 6), (500, 62)):
        key = torch.from_numpy(rng.integers(0, 50, n) << (bits - 6))  # 62 bits: wider than the packed room
        got, want = unique(key, bits), torch.unique(key, return_inverse=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("extreme", [segment_extreme, _torch_extreme], ids=["numpy", "torch"])
@pytest.mark.parametrize("how", ["amin", "amax"])
def test_segment_extremes_match_plain_python_and_leave_empty_groups_zero(how, extreme):
    group = torch.tensor([2, 0, 2, 2, 0])
    x = torch.tensor([1.5, -2.0, -0.5, 3.0, 4.0], dtype=torch.float64)
    pick = min if how == "amin" else max
    want = [pick(x[i].item() for i in range(5) if group[i] == g) if g in (0, 2) else 0.0 for g in range(4)]
    assert extreme(group, x, 4, how).tolist() == want
    ints = x.long()  # [1, -2, 0, 3, 4]: integer columns start from their own dtype's extremes
    assert extreme(group, ints, 4, how).tolist() == ([-2, 0, 0, 0] if how == "amin" else [4, 0, 3, 0])
