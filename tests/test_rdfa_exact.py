"""Every RDFA edge equals gradient x input of its target's pre-activation (patterns and LN
scales frozen) computed through TransformerLens's forward pass; every node's inputs sum to its
pre-activation; per-head pieces sum to per-source totals."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from frozen import attn_leaves, edge_dict, frozen_forward, grad_x_input, leaf, with_b_o
from tiny import random_saes, tiny_model

from catalog.ids import NodeKind
from ingest.lens import capture, hook_names, weights_of
from ingest.rdfa.graph import full_graph
from ingest.rdfa.tensors import Code, EdgeKind, Pruning

ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_model(0)
    attn, resid = random_saes(model, jump_layers=(1,))
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 8))
    lengths = torch.tensor([8, 6])
    _, cap = capture(model, tokens, lengths)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hook_names(model.cfg.n_layers))
    graph = full_graph(cap, weights_of(model), attn, resid, Pruning())
    return model, attn, resid, tokens, lengths, cache, graph


def _component_leaves(model, attn, cache, upto):
    """Leaves for every direct-path source of resid_pre[upto]: EMB, POS, attention parts, MLP outputs."""
    leaves, repl = attn_leaves(model, attn, cache, range(upto))
    for name in ("hook_embed", "hook_pos_embed"):
        leaves[name] = leaf(cache[name])
        repl[name] = leaves[name]
    for l in range(upto):
        leaves[f"m{l}"] = leaf(cache[f"blocks.{l}.hook_mlp_out"])
        repl[f"blocks.{l}.hook_mlp_out"] = leaves[f"m{l}"]
    return leaves, repl


def _component_expect(gx, b, s, upto):
    """Map gradient x input of component leaves to (src_code, src_layer, src_index, src_pos) values at s."""
    out = {(Code.EMB, -1, -1, s): gx["hook_embed"][b, s].sum(), (Code.POS, -1, -1, s): gx["hook_pos_embed"][b, s].sum()}
    for l in range(upto):
        for j in torch.nonzero(gx[f"a{l}"][b, s]).flatten().tolist():
            out[(Code.ATTN, l, j, s)] = gx[f"a{l}"][b, s, j]
        out[(Code.ERR_A, l, -1, s)] = gx[f"ea{l}"][b, s].sum()
        # the bias row is b_dec W_O + b_O: two leaves, one node (both reach s only through position s)
        out[(Code.BIAS_A, l, -1, s)] = gx[f"ba{l}"].sum() + gx[f"bo{l}"].sum()
        out[(Code.MLP, l, -1, s)] = gx[f"m{l}"][b, s].sum()
    return {k: float(v.detach()) for k, v in out.items()}


def test_resid_in_edges_equal_gradient_times_input(setup):
    model, attn, resid, tokens, lengths, cache, graph = setup
    edges = edge_dict(graph.edges, EdgeKind.RESID_IN)
    checked = 0
    for L, sae in resid.items():
        leaves, repl = _component_leaves(model, attn, cache, L)
        name = f"blocks.{L}.hook_resid_pre"
        x = with_b_o(model, leaves, repl, range(L),
                      lambda: frozen_forward(model, tokens, cache, repl, [name])[name])  # noqa: B023 - called now
        pre = sae.pre_activation(x)
        acts = sae.activation(pre.detach())
        for b in range(len(lengths)):
            for s in range(int(lengths[b])):
                for j in torch.nonzero(acts[b, s]).flatten().tolist():
                    gx = grad_x_input(pre[b, s, j], leaves)
                    expect = _component_expect(gx, b, s, L)
                    for (code, l, idx, sp), v in expect.items():
                        got = edges.get((b, code, l, idx, sp, Code.RESID, L, j, s, -1))
                        assert got is not None, f"missing resid_in edge {(code, l, idx, sp)} -> R{L}.{j}@{s}"
                        assert got == pytest.approx(v, rel=RTOL, abs=ATOL)
                        checked += 1
    assert checked > 200


def test_attn_in_edges_equal_gradient_times_input_per_head(setup):
    model, attn, resid, tokens, lengths, cache, graph = setup
    edges = edge_dict(graph.edges, EdgeKind.ATTN_IN)
    H, dh = model.cfg.n_heads, model.cfg.d_head
    checked = 0
    for L, sae in attn.items():
        rsae = resid[L]
        x = cache[f"blocks.{L}.hook_resid_pre"]
        racts = rsae.activation(rsae.pre_activation(x))
        leaves = {"a": leaf(racts), "err": leaf(x - rsae.decode(racts)), "bdec": leaf(rsae.b_dec)}
        rebuilt = leaves["a"] @ rsae.W_dec + leaves["bdec"] + leaves["err"]
        zname = f"blocks.{L}.attn.hook_z"
        z = frozen_forward(model, tokens, cache, {f"blocks.{L}.hook_resid_pre": rebuilt}, [zname])[zname]
        per_head = torch.einsum("bthe,hef->bthf", z, sae.W_enc.view(H, dh, -1))
        acts = sae.activation(sae.pre_activation(z.detach().flatten(-2)))
        for b in range(len(lengths)):
            for t in range(int(lengths[b])):
                for f in torch.nonzero(acts[b, t]).flatten().tolist():
                    for h in range(H):
                        gx = grad_x_input(per_head[b, t, h, f], leaves)
                        for s in range(t + 1):
                            for j in torch.nonzero(racts[b, s]).flatten().tolist():
                                got = edges[(b, Code.RESID, L, j, s, Code.ATTN, L, f, t, h)]
                                assert got == pytest.approx(float(gx["a"][b, s, j]), rel=RTOL, abs=ATOL)
                                checked += 1
                            got_err = edges[(b, Code.ERR_R, L, -1, s, Code.ATTN, L, f, t, h)]
                            assert got_err == pytest.approx(float(gx["err"][b, s].sum()), rel=RTOL, abs=ATOL)
                    # the b_dec leaf is shared by all positions: compare its total over s
                    total_bias = sum(v for k, v in edges.items()
                                     if k[0] == b and k[1] == Code.BIAS_R and k[5:9] == (Code.ATTN, L, f, t))
                    g_all = sum(float(grad_x_input(per_head[b, t, h, f], leaves)["bdec"].sum()) for h in range(H))
                    assert total_bias == pytest.approx(g_all, rel=RTOL, abs=ATOL)
    assert checked > 500


def test_direct_edges_equal_gradient_times_input_per_head(setup):
    """Every source kind of the direct view (EMB, POS, attention features, their SAE error and bias,
    MLP outputs) at every source position, into attention features at every destination position."""
    model, attn, resid, tokens, lengths, cache, graph = setup
    edges = edge_dict(graph.direct, EdgeKind.DIRECT)
    H, dh = model.cfg.n_heads, model.cfg.d_head
    checked = {code: 0 for code in (Code.EMB, Code.POS, Code.ATTN, Code.ERR_A, Code.BIAS_A, Code.MLP)}
    for L in (1, 2):
        sae = attn[L]
        leaves, repl = _component_leaves(model, attn, cache, L)
        zname = f"blocks.{L}.attn.hook_z"
        z = with_b_o(model, leaves, repl, range(L),
                      lambda: frozen_forward(model, tokens, cache, repl, [zname])[zname])  # noqa: B023 - called now
        per_head = torch.einsum("bthe,hef->bthf", z, sae.W_enc.view(H, dh, -1))
        acts = sae.activation(sae.pre_activation(z.detach().flatten(-2)))
        for b in range(len(lengths)):
            for t in range(int(lengths[b])):
                for f in torch.nonzero(acts[b, t]).flatten().tolist()[:3]:
                    for h in range(H):
                        gx = grad_x_input(per_head[b, t, h, f], leaves)
                        bias_total = {l: 0.0 for l in range(L)}
                        for s in range(t + 1):
                            for (code, l, j, pos), want in _component_expect(gx, b, s, L).items():
                                if code == Code.BIAS_A:
                                    continue  # a bias leaf is one vector for all positions: compared summed below
                                got = edges.get((b, code, l, j, pos, Code.ATTN, L, f, t, h), 0.0)
                                assert got == pytest.approx(want, rel=RTOL, abs=ATOL), (code, l, j, s, t, h)
                                checked[code] += 1
                            for l in range(L):
                                bias_total[l] += edges.get((b, Code.BIAS_A, l, -1, s, Code.ATTN, L, f, t, h), 0.0)
                        for l in range(L):
                            want = float((gx[f"ba{l}"].sum() + gx[f"bo{l}"].sum()).detach())
                            assert bias_total[l] == pytest.approx(want, rel=RTOL, abs=ATOL)
                            checked[Code.BIAS_A] += 1
    assert min(checked.values()) > 20, checked


def _sums_by_target(table):
    sums = defaultdict(float)
    for i in range(len(table)):
        key = (int(table.prompt[i]), int(table.dst_code[i]), int(table.dst_layer[i]), int(table.dst_index[i]),
               int(table.dst_pos[i]))
        sums[key] += float(table.value[i])
    return sums


@pytest.mark.parametrize("pruning", [Pruning(), Pruning(top_k=3, min_abs=1e-3, direct_positions=2),
                                     Pruning(top_k=3, min_abs=0.5, direct_positions=2)])
def test_completeness_every_node(setup, pruning):
    """Incoming edges (features, error, bias, REST) sum to the pre-activation recomputed from the cache."""
    model, attn, resid, tokens, lengths, cache, _ = setup
    _, cap = capture(model, tokens, lengths)
    graph = full_graph(cap, weights_of(model), attn, resid, pruning)
    edge_sums, direct_sums = _sums_by_target(graph.edges), _sums_by_target(graph.direct)
    n = graph.nodes
    assert len(n) > 100
    for i in range(len(n)):
        b, code, L, f, t = (int(n.prompt[i]), int(n.code[i]), int(n.layer[i]), int(n.index[i]), int(n.pos[i]))
        if code == Code.ATTN:
            pre = attn[L].pre_activation(cache[f"blocks.{L}.attn.hook_z"][b, t].flatten())[f]
            assert direct_sums[(b, code, L, f, t)] == pytest.approx(float(pre), rel=RTOL, abs=ATOL)
        else:
            pre = resid[L].pre_activation(cache[f"blocks.{L}.hook_resid_pre"][b, t])[f]
        assert edge_sums[(b, code, L, f, t)] == pytest.approx(float(pre), rel=RTOL, abs=ATOL)
    rest = graph.edges.value[graph.edges.src_code == Code.REST]
    if pruning.top_k is None:
        assert rest.abs().max() < 1e-4  # nothing pruned: the edges alone are complete
    else:
        assert rest.abs().max() > 1e-3  # pruning really removed something and REST carries it


def test_per_head_pieces_sum_to_step1_dfa_per_source_position(setup):
    """Sum over heads, features, error and bias at s of the attn_in edges = A[h,t,s] v_s,h . W_enc (step 1)."""
    model, attn, resid, tokens, lengths, cache, graph = setup
    H, dh = model.cfg.n_heads, model.cfg.d_head
    L = 2
    v = cache[f"blocks.{L}.attn.hook_pattern"]  # [B,H,T,S]
    x = cache[f"blocks.{L}.hook_resid_pre"]
    xc = (x - x.mean(-1, keepdim=True)) / cache[f"blocks.{L}.ln1.hook_scale"]
    vals = torch.einsum("bsd,hde->bshe", xc, model.blocks[L].attn.W_V) + model.blocks[L].attn.b_V
    per = defaultdict(float)
    e = graph.edges
    for i in torch.nonzero((e.kind == EdgeKind.ATTN_IN) & (e.dst_layer == L) & (e.head >= 0)).flatten().tolist():
        per[(int(e.prompt[i]), int(e.dst_index[i]), int(e.dst_pos[i]), int(e.src_pos[i]), int(e.head[i]))] += float(e.value[i])
    assert len(per) > 50
    W = attn[L].W_enc.view(H, dh, -1)
    for (b, f, t, s, h), got in per.items():
        want = v[b, h, t, s] * (vals[b, s, h] @ W[h, :, f])
        assert got == pytest.approx(float(want.detach()), rel=RTOL, abs=ATOL)


def test_direct_pairs_are_each_targets_largest_step1_dfa(setup):
    """Step 5's (head, source position) pairs of each target are its direct_positions largest |step-1 DFA|,
    A[h,t,s] v_s,h . W_enc[h-slice, f] over s <= t, recomputed here from TransformerLens's cache."""
    from ingest.rdfa import steps

    model, attn, _, tokens, lengths, cache, _ = setup
    H, dh = model.cfg.n_heads, model.cfg.d_head
    _, cap = capture(model, tokens, lengths)
    weights = weights_of(model)
    compared = 0
    for L in range(model.cfg.n_layers):
        act = steps.active_set(attn[L], cap.z[L].flatten(-2), cap.valid)
        b, t, k = act.mask.nonzero(as_tuple=True)
        f = act.index[b, t, k]
        pairs = steps.direct_pairs(cap.resid_pre[L], cap.ln1_scale[L], cap.pattern[L], weights.W_V[L], weights.b_V[L],
                                   attn[L], b, t, f, Pruning(top_k=3, direct_positions=2))
        x = cache[f"blocks.{L}.hook_resid_pre"]
        xc = (x - x.mean(-1, keepdim=True)) / cache[f"blocks.{L}.ln1.hook_scale"]
        v = (torch.einsum("bsd,hde->bshe", xc, model.blocks[L].attn.W_V) + model.blocks[L].attn.b_V).detach()  # [B,S,H,dh]
        W = attn[L].W_enc.view(H, dh, -1)
        pattern = cache[f"blocks.{L}.attn.hook_pattern"]  # [B,H,T,S]
        for n in range(len(b)):
            bn, tn, fn = int(b[n]), int(t[n]), int(f[n])
            dfa = {(h, s): abs(float(pattern[bn, h, tn, s] * (v[bn, s, h] @ W[h, :, fn])))
                   for h in range(H) for s in range(tn + 1)}
            ranked = sorted(dfa.values(), reverse=True)
            if len(ranked) > 2 and ranked[1] - ranked[2] <= 1e-4 * ranked[1]:
                continue  # a near tie for second place: either pair is right
            want = set(sorted(dfa, key=lambda hs: -dfa[hs])[:2])
            assert {(int(pairs.head[n, p]), int(pairs.pos[n, p])) for p in range(2)} == want, (L, n)
            compared += 1
    assert compared > 100


@pytest.mark.parametrize("min_abs", [0.0, 0.5])
def test_top_k_pruning_keeps_each_targets_largest_edges(setup, min_abs):
    """With top_k=3 every target keeps exactly the 3 largest-|value| candidate edges of the exact graph
    (sorted here in plain Python) that clear min_abs, per head, for attn_in, resid_in and the direct
    view."""
    model, attn, resid, tokens, lengths, _, exact = setup
    _, cap = capture(model, tokens, lengths)
    pruned = full_graph(cap, weights_of(model), attn, resid, Pruning(top_k=3, min_abs=min_abs))

    own_constant = {Code.ATTN: Code.BIAS_A, Code.RESID: Code.BIAS_R}

    def candidates(table):
        by_target = defaultdict(dict)
        for i in range(len(table)):
            src, dst = int(table.src_code[i]), int(table.dst_code[i])
            if src == Code.REST or (src == own_constant[dst] and int(table.src_layer[i]) == int(table.dst_layer[i])):
                continue  # pruning's remainder and the target SAE's own constant are not candidates
            target = tuple(int(getattr(table, c)[i]) for c in ("prompt", "dst_code", "dst_layer", "dst_index", "dst_pos", "kind"))
            source = tuple(int(getattr(table, c)[i]) for c in ("src_code", "src_layer", "src_index", "src_pos", "head"))
            by_target[target][source] = float(table.value[i])
        return by_target

    want = {**candidates(exact.edges), **candidates(exact.direct)}
    got = {**candidates(pruned.edges), **candidates(pruned.direct)}
    assert set(got) <= set(want) and len(got) > 100
    assert any(target[-1] == EdgeKind.DIRECT for target in got)
    for target, edges in want.items():
        top = dict(sorted(edges.items(), key=lambda kv: -abs(kv[1]))[:3])
        assert got.get(target, {}).keys() == {s for s, v in top.items() if v != 0 and abs(v) >= min_abs}, target
        for source, value in got.get(target, {}).items():
            assert value == pytest.approx(top[source], rel=1e-6, abs=1e-7)


def test_position_blocks_pad_each_group_alone_and_do_not_change_edges(setup, monkeypatch):
    """Steps 4-5 run over blocks of positions padded to their own busiest position; the exactness
    setup spans several paddings, and one position per block gives the same edges."""
    from ingest.rdfa import blocks, steps

    model, attn, resid, tokens, lengths, _, graph = setup
    _, cap = capture(model, tokens, lengths)
    acts = {l: steps.active_set(s, cap.z[l].flatten(-2), cap.valid) for l, s in attn.items()}
    grouped = blocks.position_blocks(cap, weights_of(model), {l: (attn[l], acts[l]) for l in attn})
    assert len({b.rows.vec.shape[2] for b in grouped}) > 1
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1)
    single = full_graph(cap, weights_of(model), attn, resid, Pruning())
    for kind in (EdgeKind.RESID_IN, EdgeKind.DIRECT):
        table = graph.edges if kind == EdgeKind.RESID_IN else graph.direct
        other = single.edges if kind == EdgeKind.RESID_IN else single.direct
        want, got = edge_dict(table, kind), edge_dict(other, kind)
        assert want.keys() == got.keys() and len(want) > 100
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=RTOL, abs=ATOL)  # float32 matmul shapes differ


@pytest.mark.parametrize("batched", [False, True], ids=["loop", "batched"])
def test_rows_dot_equals_a_plain_product_whatever_the_counts(monkeypatch, batched):
    """rows_dot runs one product per position (the loop, and CUDA's batched form forced here): against a
    per-query product, with one position chosen by 70 queries, a few by 2-5, many by 1, one by none."""
    from ingest.rdfa import steps
    from ingest.rdfa.steps import rows_dot

    monkeypatch.setattr(steps, "BATCHED_ROWS_DOT", batched)

    g = torch.Generator().manual_seed(3)
    vec = torch.randn(12, 9, 16, generator=g)
    loc = torch.cat([torch.full((70,), 4), torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2]), torch.arange(5, 12)])
    loc = loc.sort().values  # rows_dot takes each position's queries together
    q = torch.randn(loc.shape[0], 16, generator=g)
    want = torch.stack([vec[int(s)] @ q[m] for m, s in enumerate(loc)])
    torch.testing.assert_close(rows_dot(vec, loc, q), want, rtol=1e-5, atol=1e-6)
    assert rows_dot(vec, loc[:0], q[:0]).shape == (0, 9)


def test_gather_rows_equals_advanced_indexing_on_views_and_copies():
    """gather_rows reads rows by flat number from the memory under its argument: a prefix of rows (what steps 4 and 5
    pass), a slice starting past the storage's first row, broadcast index tensors, and a layout whose rows are not
    whole (a transposed view), which falls back to plain indexing. Each against torch's own advanced indexing."""
    from ingest.rdfa.steps import gather_rows

    g = torch.Generator().manual_seed(5)
    full = torch.randn(3, 7, 11, 16, generator=g)
    prefix = full[:, 2:, :6]  # [3, 5, 6, 16]: rows whole, strides multiples of 16, offset into the storage
    b = torch.tensor([2, 0, 1])[:, None, None]
    t = torch.tensor([[4, 0], [1, 3], [2, 2]])[:, :, None]
    r = torch.randint(0, 6, (3, 2, 5), generator=g)
    assert torch.equal(gather_rows(prefix, b, t, r), prefix[b, t, r])
    assert torch.equal(gather_rows(full[1], t[..., 0], r[:, :, 0]), full[1][t[..., 0], r[:, :, 0]])
    crossed = full[0].transpose(1, 2)  # [7, 16, 11]: a row's 11 floats are 16 apart
    i, j = torch.tensor([[6], [0]]), torch.tensor([[15, 3, 0]])
    assert torch.equal(gather_rows(crossed, i, j), crossed[i, j])


@pytest.mark.parametrize("split", [1000, 4], ids=["one group", "queries grouped by need"])
def test_rows_dot_top_parts_keeps_every_top_value_that_reaches_at_least(monkeypatch, split):
    """Step 5's bounded row products (steps.rows_dot_top_parts, one block) against per-query products sorted
    in plain Python: every row among its query's top 3 and at least its at_least (what step 5 may keep) is
    returned, every returned value is its row's exact product, sorted by |value|; a zero query, and one whose
    at_least is infinite (a zero attention scale), give nothing wrong; and the bound skipped products (counted
    by torch's FLOP counter). Also with a busy position's queries multiplied in groups by the rows each needs
    (steps._query_groups)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ingest.rdfa import steps

    monkeypatch.setattr(steps, "SPLIT_QUERIES", split)

    g = torch.Generator().manual_seed(5)
    # norms spread over two orders of magnitude, as error rows against small feature rows
    vec = torch.randn(6, 200, 16, generator=g) * torch.logspace(-1.5, 0.5, 200)[torch.randperm(200, generator=g)][:, None]
    loc = torch.cat([torch.full((40,), 1), torch.full((3,), 2), torch.arange(3, 6)]).sort().values
    q = torch.randn(loc.shape[0], 16, generator=g)
    q[5] = 0
    at_least = torch.rand(loc.shape[0], generator=g) * 0.5
    at_least[7] = torch.inf
    norms, order = torch.linalg.vector_norm(vec, dim=-1).sort(dim=1, descending=True)
    with FlopCounterMode(display=False) as flops:
        value, row = steps.rows_dot_top_parts([steps.RowsPart(vec, norms, order, loc)], q, torch.arange(46), 3,
                                              at_least)
    assert value.shape == row.shape == (46, 3)
    for m, s in enumerate(loc.tolist()):
        want = [float(vec[s, r].double() @ q[m].double()) for r in range(200)]
        third = sorted((abs(v) for v in want), reverse=True)[2]
        must = {r for r, w in enumerate(want) if abs(w) >= third and abs(w) >= at_least[m] and w != 0}
        assert must <= set(row[m].tolist()), m
        for v, r in zip(value[m].tolist(), row[m].tolist()):
            assert v == pytest.approx(want[r], rel=1e-5, abs=1e-5), (m, r)
        assert value[m].abs().tolist() == sorted(value[m].abs().tolist(), reverse=True)
    assert flops.get_total_flops() < 0.6 * 2 * 46 * 200 * 16  # the plain products of 46 queries x 200 rows


def test_rows_dot_top_parts_keeps_every_row_its_target_may_keep(monkeypatch):
    """Step 5's products over several blocks with each query's floor taken from its target's pairs
    (steps.TargetsOf), against plain Python: for every target, each of its top 3 values over all its pairs (|A/sigma
    x product|, at least min_abs) is returned by its pair with the exact product; returned values are their rows'
    exact products; and the shared floor skips more products than each pair's own (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ingest.rdfa import steps

    monkeypatch.setattr(steps, "SPLIT_QUERIES", 4)
    monkeypatch.setattr(steps, "FIRST_ROWS", 3)  # a first pass of three rows: the floors decide what else runs
    g = torch.Generator().manual_seed(7)
    N, P, d, top, min_abs = 60, 2, 3, 3, 0.05  # d 3: products come near their bounds, so a loose floor shows
    blocks = [(5, 150), (4, 90)]  # (positions, rows) of two blocks
    vecs = [torch.randn(S, R, d, generator=g) * torch.logspace(-1.5, 0.5, R)[torch.randperm(R, generator=g)][:, None]
            for S, R in blocks]
    block = torch.randint(0, 2, (N, P), generator=g)
    pos = torch.stack([torch.randint(0, blocks[int(b)][0], (), generator=g) for b in block.flatten()]).view(N, P)
    source = torch.randn(N * P, d, generator=g)
    scale = torch.rand(N * P, generator=g) * torch.tensor([1.0, 0.2]).repeat(N)  # a strong and a weak pair
    scale[3] = 0
    pairs = torch.arange(N * P)
    parts, order = [], []
    for i, vec in enumerate(vecs):  # the queries of each block, by position
        mine = pairs[block.flatten() == i]
        mine = mine[torch.argsort(pos.flatten()[mine], stable=True)]
        norms, by_norm = torch.linalg.vector_norm(vec, dim=-1).sort(dim=1, descending=True)
        parts.append(steps.RowsPart(vec, norms, by_norm, pos.flatten()[mine]))
        order.append(mine)
    chosen = torch.cat(order)
    at_least = torch.where(scale[chosen] != 0, min_abs / scale[chosen].abs(), torch.inf)

    def run(targets):
        with FlopCounterMode(display=False) as flops:
            out = steps.rows_dot_top_parts(parts, source, chosen, top, at_least, targets)
        return out, flops.get_total_flops()

    (value, row), shared = run(steps.TargetsOf(chosen, P, N, scale[chosen]))
    _, own = run(None)
    assert shared < own
    got = {int(m): (value[i].tolist(), row[i].tolist()) for i, m in enumerate(chosen)}
    for n in range(N):
        cands = []
        for p in range(P):
            m = n * P + p
            vec = vecs[int(block[n, p])][int(pos[n, p])]
            exact = [float(vec[r].double() @ source[m].double()) for r in range(vec.shape[0])]
            for v, r in zip(*got[m]):
                assert v == pytest.approx(exact[r], rel=1e-5, abs=1e-5), (n, p, r)
            cands += [(abs(float(scale[m]) * e), m, r) for r, e in enumerate(exact)]
        cands.sort(reverse=True)
        for size, m, r in cands[:top]:
            if size >= min_abs and size > 0:
                assert r in got[m][1], (n, m, r)


@pytest.mark.parametrize("min_abs", [0.0, 0.3])
def test_step2_bounds_keep_each_lone_targets_top_edges(monkeypatch, min_abs):
    """One target a position, so no other target's floor lets a block through: attn_in with its bounds
    keeps exactly the top 3 (and >= min_abs) per-head edges of value = A[h,t,s] (center(vec)/sigma_s) W_V[h] .
    W_enc[h-slice, f], computed here by that definition in float64, and skips blocks doing it."""
    from ingest.rdfa import step2
    from ingest.rdfa.steps import FlatRows
    from ingest.rdfa.tensors import ActiveSet
    from ingest.rdfa.types import SaeWeights

    g = torch.Generator().manual_seed(11)
    T, d, H, dh, n_rows, d_sae = 7, 16, 2, 8, 21, 10
    spread = torch.logspace(-2, 0.5, n_rows)  # row norms over 2.5 orders of magnitude
    vec = torch.randn(T, n_rows, d, generator=g) * spread[torch.randperm(n_rows, generator=g)][:, None]
    pos = torch.arange(T).repeat_interleave(n_rows)
    minus = torch.full((T * n_rows,), -1)
    resid = SaeWeights(NodeKind.RESID, 0, torch.randn(d, 4, generator=g), torch.zeros(4), torch.randn(4, d, generator=g),
                       torch.zeros(d))
    rows = FlatRows(vec.view(-1, d), torch.zeros_like(pos), pos, torch.full_like(pos, int(Code.ERR_R)), minus, minus,
                    torch.zeros(T * n_rows), resid)
    sigma = torch.rand(1, T, generator=g) + 0.5
    scores = torch.randn(1, H, T, T, generator=g) * 2
    pattern = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -torch.inf).softmax(-1)
    W_V = torch.randn(H, d, dh, generator=g)
    sae = SaeWeights(NodeKind.ATTN, 0, torch.randn(H * dh, d_sae, generator=g), torch.zeros(d_sae),
                     torch.randn(d_sae, H * dh, generator=g), torch.zeros(H * dh))
    feature = torch.randint(0, d_sae, (1, T, 1), generator=g)
    targets = ActiveSet(feature, torch.ones(1, T, 1), torch.ones(1, T, 1), torch.ones(1, T, 1, dtype=torch.bool))
    monkeypatch.setattr(step2, "BOUND_FIRST", 1)
    skipped, needed_blocks = [0], step2._needed_blocks

    def counting(layer, group, t0, t1, mb, *rest):
        blocks = needed_blocks(layer, group, t0, t1, mb, *rest)
        skipped[0] += blocks.shape[0] * blocks.shape[1] * mb - int((blocks < mb).sum())
        return blocks

    monkeypatch.setattr(step2, "_needed_blocks", counting)
    table, _ = step2.attn_in(rows, sigma, pattern, W_V, sae, targets, Pruning(top_k=3, min_abs=min_abs), budget=64)
    assert skipped[0] > 0
    centered = (vec - vec.mean(-1, keepdim=True)).double() / sigma[0, :, None, None].double()  # [T, rows, d]
    want = {}
    for t in range(T):
        f = int(feature[0, t, 0])
        cands = []
        for h in range(H):
            w = W_V[h].double() @ sae.W_enc[h * dh:(h + 1) * dh, f].double()  # [d]
            for s in range(t + 1):
                for r in range(n_rows):
                    cands.append(((s, h), float(pattern[0, h, t, s]) * float(centered[s, r] @ w)))
        top = sorted(cands, key=lambda c: -abs(c[1]))[:3]
        want[t] = sorted((v, s_h) for s_h, v in top if v != 0 and abs(v) >= min_abs)
    for t in range(T):  # (FlatRows carry no row id: a position's rows are told apart by their values)
        kept = sorted((float(v), (int(s), int(h))) for v, s, h, dst in zip(table.value, table.src_pos, table.head,
                                                                         table.dst_pos) if int(dst) == t)
        assert [s_h for _, s_h in kept] == [s_h for _, s_h in want[t]], t
        assert [v for v, _ in kept] == pytest.approx([v for v, _ in want[t]], rel=1e-5, abs=1e-6), t


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("min_abs", [0.0, 0.05])
def test_bounds_skip_blocks_and_rows_yet_keep_every_edge(setup, monkeypatch, min_abs, precision):
    """Step 2 computes only the blocks whose Cauchy-Schwarz bound reaches some target's floor, steps 4 and 5
    only such rows (ingest/rdfa/step2.py, steps.bounded_values): made to bite on the tiny
    model (first passes of one block and three rows), they skip work, and the graph keeps the dense
    computation's edges, values and REST, target by target; in bfloat16 too, whose rounding the bounds' slack
    covers."""
    from torch.utils.flop_counter import FlopCounterMode

    from ingest.rdfa import step2, steps

    model, attn, resid, tokens, lengths, _, _ = setup
    _, cap = capture(model, tokens, lengths)
    pruning = Pruning(top_k=3, min_abs=min_abs, direct_positions=2, precision=precision)
    with monkeypatch.context() as dense:
        dense.setattr(step2, "BOUNDED", False)
        dense.setattr(steps, "BOUNDED", False)
        want = full_graph(cap, weights_of(model), attn, resid, pruning)
    monkeypatch.setattr(step2, "BOUND_FIRST", 1)
    monkeypatch.setattr(steps, "FIRST_ROWS", 3)
    monkeypatch.setattr(steps, "SPLIT_QUERIES", 4)  # busy positions' queries in groups by the rows they need
    monkeypatch.setattr(step2, "MIN_BAND_WORK", 1)  # several bands a prompt, which share its thresholds
    skipped = {"blocks": 0, "rows": 0, "step 4 rows": 0}
    shared = {"bands": 0}
    needed_blocks, rows_dot_top_parts, resid_in = step2._needed_blocks, steps.rows_dot_top_parts, steps.resid_in

    def counting_blocks(layer, group, t0, t1, mb, tgt, ok, pruning, bounds=None):
        blocks = needed_blocks(layer, group, t0, t1, mb, tgt, ok, pruning, bounds)
        skipped["blocks"] += blocks.shape[0] * blocks.shape[1] * mb - int((blocks < mb).sum())
        if bounds is not None:  # the prompts' thresholds, computed once, choose what the band's own first pass does
            shared["bands"] += 1
            assert torch.equal(blocks, needed_blocks(layer, group, t0, t1, mb, tgt, ok, pruning)), (t0, t1)
        return blocks

    def counting_rows(parts, source, *rest):
        with FlopCounterMode(display=False) as flops:
            out = rows_dot_top_parts(parts, source, *rest)
        dense = sum(part.loc.shape[0] * part.vec.shape[1] for part in parts)  # every query against every row
        skipped["rows"] += dense - flops.get_total_flops() // (2 * source.shape[1])
        return out

    def counting_step4(rows, sae, targets, *rest):
        with FlopCounterMode(display=False) as flops:
            out = resid_in(rows, sae, targets, *rest)
        dense = math.prod(targets.index.shape) * rows.vec.shape[2]  # every target against every row
        skipped["step 4 rows"] += dense - flops.get_total_flops() // (2 * rows.vec.shape[3])
        return out

    monkeypatch.setattr(step2, "_needed_blocks", counting_blocks)
    monkeypatch.setattr(steps, "rows_dot_top_parts", counting_rows)
    monkeypatch.setattr(steps, "resid_in", counting_step4)
    got = full_graph(cap, weights_of(model), attn, resid, pruning)
    assert min(skipped.values()) > 0 and shared["bands"] > 10, (skipped, shared)
    for kind in (EdgeKind.ATTN_IN, EdgeKind.RESID_IN):
        w, g = edge_dict(want.edges, kind), edge_dict(got.edges, kind)
        assert w.keys() == g.keys() and len(w) > 100
        # step 2 computes its kept values in the same products either way; step 4 multiplies a few rows
        # first, then the rest: float32 matmuls of other shapes round differently
        rel, tol = (1e-6, 1e-7) if kind == EdgeKind.ATTN_IN else (RTOL, ATOL)
        bad = [(k, v, g[k]) for k, v in w.items() if g[k] != pytest.approx(v, rel=rel, abs=tol)]
        assert not bad, (kind, len(bad), bad[:3])
    w, g = edge_dict(want.direct, EdgeKind.DIRECT), edge_dict(got.direct, EdgeKind.DIRECT)
    assert w.keys() == g.keys() and len(w) > 50
    for k, v in w.items():  # products of a few rows against all of them: float32 matmul shapes differ
        assert g[k] == pytest.approx(v, rel=RTOL, abs=ATOL)
    # the same kept edges (above), whose sums round as their values do
    torch.testing.assert_close(got.nodes.explained, want.nodes.explained, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("budget", [64, 1 << 20], ids=["many bands", "few bands"])
@pytest.mark.parametrize("pruning", [Pruning(), Pruning(top_k=3, min_abs=1e-3, direct_positions=2)])
def test_step2_over_all_prompts_at_once_gives_the_per_prompt_edges(setup, monkeypatch, budget, pruning):
    """Step 2 and rows_dot in CUDA's forms (forced here on CPU: every prompt in one padded band loop,
    bands of a position or of the whole prompt) keep the same attn_in edges with the same values, the
    same direct edges, and the same REST per node, as the CPU's prompt-by-prompt forms."""
    from ingest.rdfa import step2, steps

    model, attn, resid, tokens, lengths, _, _ = setup
    _, cap = capture(model, tokens, lengths)
    monkeypatch.setattr(step2, "PROMPTS_TOGETHER", False)  # (a batch this small would go whole by itself)
    per_prompt = full_graph(cap, weights_of(model), attn, resid, pruning)
    monkeypatch.setattr(step2, "PROMPTS_TOGETHER", True)
    monkeypatch.setattr(steps, "BATCHED_ROWS_DOT", True)
    monkeypatch.setattr(step2, "BAND_ELEMENTS", budget)
    together = full_graph(cap, weights_of(model), attn, resid, pruning)
    want, got = edge_dict(per_prompt.edges, EdgeKind.ATTN_IN), edge_dict(together.edges, EdgeKind.ATTN_IN)
    assert want.keys() == got.keys() and len(want) > 100
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=RTOL, abs=ATOL)
    torch.testing.assert_close(together.nodes.explained, per_prompt.nodes.explained, rtol=RTOL, atol=ATOL)
    want, got = edge_dict(per_prompt.direct, EdgeKind.DIRECT), edge_dict(together.direct, EdgeKind.DIRECT)
    assert want.keys() == got.keys() and len(want) > 10
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=RTOL, abs=ATOL)


def _rest_share(graph) -> list[float]:
    """Per decomposed node: |its REST edge| / the sum of |value| over all its incoming edges."""
    total, rest = defaultdict(float), defaultdict(float)
    e = graph.edges
    for i in range(len(e)):
        node = tuple(int(getattr(e, c)[i]) for c in ("prompt", "dst_code", "dst_layer", "dst_index", "dst_pos"))
        value = float(e.value[i])
        total[node] += abs(value)
        if int(e.src_code[i]) == Code.REST:
            rest[node] += value
    return sorted(abs(rest[node]) / total[node] for node in total)


@pytest.mark.parametrize("precision, worst, typical", [("bfloat16", 0.03, 3e-3), ("float16", 5e-3, 5e-4)])
def test_reduced_precision_leaves_its_stated_error_in_rest(setup, precision, worst, typical):
    """With the products in bfloat16 or float16 (Pruning.precision) every edge value of the exact graph
    carries that dtype's rounding, and each node's REST edge (zero to float32 rounding when nothing is
    pruned) absorbs it: at most ``worst`` and, at the median node, ``typical`` of the sum of |incoming|,
    the bounds docs/rdfa.md states; and well above float32's, so the option takes effect."""
    model, attn, resid, tokens, lengths, _, exact = setup
    _, cap = capture(model, tokens, lengths)
    low = full_graph(cap, weights_of(model), attn, resid, Pruning(precision=precision))
    exact_share, low_share = _rest_share(exact), _rest_share(low)
    assert len(low_share) == len(exact_share) > 100
    assert exact_share[-1] < 1e-5
    median = low_share[len(low_share) // 2]
    assert low_share[-1] <= worst and median <= typical
    assert median > 10 * exact_share[len(exact_share) // 2]


def test_precision_is_checked_and_recorded_in_the_manifest():
    with pytest.raises(ValueError, match="precision 'float64'"):
        Pruning(precision="float64")
    assert "precision" not in Pruning().manifest()  # runs made before the option keep equal manifests
    assert Pruning(precision="bfloat16").manifest()["precision"] == "bfloat16"


@pytest.mark.parametrize("min_abs", [0.0, 0.05])
def test_top_k_pruning_keeps_each_scores_largest_qk_terms(setup, min_abs):
    """With top_k=3 each decomposed attention score keeps exactly the 3 largest-|value| q_in, k_in and qk
    terms of the exact graph's (sorted here in plain Python) that clear min_abs."""
    model, attn, resid, tokens, lengths, _, exact = setup
    _, cap = capture(model, tokens, lengths)
    pruned = full_graph(cap, weights_of(model), attn, resid, Pruning(top_k=3, min_abs=min_abs))

    def terms(table):
        by_score = defaultdict(dict)
        for row in zip(*(getattr(table, c).tolist() for c in table.COLUMNS)):
            e = dict(zip(table.COLUMNS, row))
            score = (e["prompt"], e["dst_layer"], e["head"], e["src_pos"], e["dst_pos"], e["kind"])
            term = (e["src_code"], e["src_layer"], e["src_index"], e["dst_code"], e["dst_index"])
            assert term not in by_score[score]
            by_score[score][term] = e["value"]
        return by_score

    want, got = terms(exact.qk), terms(pruned.qk)
    assert set(got) <= set(want) and len(got) > 100
    assert {score[-1] for score in got} == {EdgeKind.Q_IN, EdgeKind.K_IN, EdgeKind.QK}
    for score, kept in got.items():
        top = dict(sorted(want[score].items(), key=lambda kv: -abs(kv[1]))[:3])
        assert kept.keys() == {t for t, v in top.items() if v != 0 and abs(v) >= min_abs}, score
        for term, value in kept.items():
            assert value == pytest.approx(top[term], rel=1e-5, abs=1e-6)


def test_step2_takes_a_small_batch_whole_and_a_large_one_prompt_by_prompt_on_the_cpu():
    """The CPU's step 2 pads nothing for GPT-2-sized prompts (one band loop a prompt), but a toy batch, whose
    bands would cost more in operators than in products, goes as one group in few bands."""
    from ingest.rdfa import step2

    def shapes(B, T, targets, blocks):
        targets_at = torch.full((B, T), targets)
        before = torch.zeros(B, T + 1, dtype=torch.long)
        before[:, 1:] = torch.arange(1, T + 1) * blocks
        return targets_at, before

    toy = shapes(8, 15, 10, 2)  # 8 prompts of 15 tokens, 10 features a position, 2 blocks of rows each
    assert step2.prompt_groups(*toy, heads=4) == [range(8)]
    assert len(step2.band_bounds(*toy, heads=4, budget=step2.BAND_ELEMENTS)) == 1
    gpt2 = shapes(8, 64, 38, 5)
    assert step2.prompt_groups(*gpt2, heads=12) == [range(b, b + 1) for b in range(8)]
    one = tuple(x[:1] for x in gpt2)
    assert len(step2.band_bounds(*one, heads=12, budget=step2.BAND_ELEMENTS)) >= step2.MIN_BANDS
