"""Transcoders in RDFA, checked independently: every ``mlp_in`` edge into a transcoder feature, and every edge
out of a transcoder feature, error or bias (resid_in, direct), equals gradient x input through TransformerLens's
forward pass with patterns and LN scales frozen, where the MLP's output is rebuilt from SAELens's own transcoder
forward (``Transcoder.encode`` / ``decode``) and the target's pre-activation is read from SAELens's hook; every
transcoder feature's incoming edges sum to that pre-activation. The transcoders reach RDFA the way a user's do:
saved in SAELens's on-disk format and loaded by ingest.saes."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from frozen import attn_leaves, edge_dict, frozen_forward, grad_x_input, leaf, with_b_o
from tiny import random_saes, random_transcoders, tiny_model

from catalog.ids import NodeKind
from ingest.lens import capture, hook_names, weights_of
from ingest.rdfa.graph import full_graph
from ingest.rdfa.tensors import Code, EdgeKind, Pruning
from ingest.saes import load_sae_dir

ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_model(0)
    attn, resid = random_saes(model, jump_layers=(1,))
    reference = random_transcoders(model, jump_layers=(1,))  # SAELens objects: the reference's forward
    folder = tmp_path_factory.mktemp("transcoders")
    for l, tc in reference.items():
        tc.save_model(folder / f"blocks.{l}.ln2.hook_normalized")
    transcoders = {s.layer: s.weights for s in load_sae_dir(folder, "cpu", release=str(folder), local=True)}
    n_layers = model.cfg.n_layers
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 8))
    lengths = torch.tensor([8, 6])
    _, cap = capture(model, tokens, lengths, transcoders)
    names = hook_names(n_layers, range(n_layers))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    graph = full_graph(cap, weights_of(model), attn, resid, Pruning(), transcoders)
    return model, attn, resid, reference, transcoders, tokens, lengths, cache, graph


def _sae_lens_pre(tc, x):
    """(pre-activations, activations) of SAELens transcoder ``tc`` on ``x`` [..., d]: the pre-activation as
    SAELens's hook_sae_acts_pre sees it, in the autograd graph."""
    got = {}
    handle = tc.hook_sae_acts_pre.register_forward_hook(lambda module, args, out: got.setdefault("pre", out))
    try:
        acts = tc.encode(x)
    finally:
        handle.remove()
    return got["pre"], acts


def _leaves(model, attn, reference, cache, attn_layers, mlp_layers):
    """Leaves for EMB, POS, the attention parts of ``attn_layers`` and, for ``mlp_layers``, the MLP output rebuilt
    from its transcoder's features (SAELens's encode of the cached MLP input), error and decoder bias."""
    leaves, repl = attn_leaves(model, attn, cache, attn_layers)
    for name in ("hook_embed", "hook_pos_embed"):
        leaves[name] = leaf(cache[name])
        repl[name] = leaves[name]
    for l in mlp_layers:
        tc = reference[l]
        with torch.no_grad():
            acts = tc.encode(cache[f"blocks.{l}.ln2.hook_normalized"])
            err = cache[f"blocks.{l}.hook_mlp_out"] - tc.decode(acts)
        leaves[f"t{l}"], leaves[f"et{l}"], leaves[f"bt{l}"] = leaf(acts), leaf(err), leaf(tc.b_dec)
        repl[f"blocks.{l}.hook_mlp_out"] = leaves[f"t{l}"] @ tc.W_dec.detach() + leaves[f"bt{l}"] + leaves[f"et{l}"]
    return leaves, repl


def _expect(gx, b, s, attn_layers, mlp_layers):
    """Gradient x input of the leaves at position s as {(src_code, src_layer, src_index, s): value}; a bias
    leaf (one vector for all positions) is given whole, which is its share at s where only s reaches it."""
    out = {(Code.EMB, -1, -1, s): gx["hook_embed"][b, s].sum(), (Code.POS, -1, -1, s): gx["hook_pos_embed"][b, s].sum()}
    for l in attn_layers:
        for j in torch.nonzero(gx[f"a{l}"][b, s]).flatten().tolist():
            out[(Code.ATTN, l, j, s)] = gx[f"a{l}"][b, s, j]
        out[(Code.ERR_A, l, -1, s)] = gx[f"ea{l}"][b, s].sum()
        out[(Code.BIAS_A, l, -1, s)] = gx[f"ba{l}"].sum() + gx[f"bo{l}"].sum()
    for l in mlp_layers:
        for j in torch.nonzero(gx[f"t{l}"][b, s]).flatten().tolist():
            out[(Code.TC, l, j, s)] = gx[f"t{l}"][b, s, j]
        out[(Code.ERR_T, l, -1, s)] = gx[f"et{l}"][b, s].sum()
        out[(Code.BIAS_T, l, -1, s)] = gx[f"bt{l}"].sum()
    return {k: float(v.detach()) for k, v in out.items()}


def test_mlp_in_edges_equal_gradient_times_input(setup):
    """Into every active feature of every transcoder: EMB, POS, the attention parts of its own and earlier
    layers, and the transcoder features, errors and biases of earlier layers, at the feature's position."""
    model, attn, _, reference, _, tokens, lengths, cache, graph = setup
    edges = edge_dict(graph.edges, EdgeKind.MLP_IN)
    checked = defaultdict(int)
    for L, tc in reference.items():
        attn_layers, mlp_layers = range(L + 1), range(L)
        leaves, repl = _leaves(model, attn, reference, cache, attn_layers, mlp_layers)
        name = f"blocks.{L}.ln2.hook_normalized"
        x = with_b_o(model, leaves, repl, attn_layers,
                     lambda: frozen_forward(model, tokens, cache, repl, [name])[name])  # noqa: B023 - called now
        pre, acts = _sae_lens_pre(tc, x)
        for b in range(len(lengths)):
            for s in range(int(lengths[b])):
                for j in torch.nonzero(acts[b, s]).flatten().tolist():
                    expect = _expect(grad_x_input(pre[b, s, j], leaves), b, s, attn_layers, mlp_layers)
                    for (code, l, idx, sp), want in expect.items():
                        got = edges.get((b, code, l, idx, sp, Code.TC, L, j, s, -1))
                        assert got is not None, f"missing mlp_in edge {(code, l, idx, sp)} -> T{L}.{j}@{s}"
                        assert got == pytest.approx(want, rel=RTOL, abs=ATOL), (code, l, idx, s, L, j)
                        checked[code] += 1
    assert checked[Code.TC] > 20 and checked[Code.ATTN] > 50 and checked[Code.ERR_T] > 10, dict(checked)
    assert not any(key[1] == Code.MLP for key in edges)


def test_resid_in_edges_from_transcoder_nodes_equal_gradient_times_input(setup):
    """With transcoders, a residual feature's MLP sources are the transcoders' features, errors and biases."""
    model, attn, resid, reference, _, tokens, lengths, cache, graph = setup
    edges = edge_dict(graph.edges, EdgeKind.RESID_IN)
    assert not any(key[1] == Code.MLP for key in edges)
    checked = defaultdict(int)
    for L, sae in resid.items():
        leaves, repl = _leaves(model, attn, reference, cache, range(L), range(L))
        name = f"blocks.{L}.hook_resid_pre"
        x = with_b_o(model, leaves, repl, range(L),
                     lambda: frozen_forward(model, tokens, cache, repl, [name])[name])  # noqa: B023 - called now
        pre = sae.pre_activation(x)
        acts = sae.activation(pre.detach())
        for b in range(len(lengths)):
            for s in range(int(lengths[b])):
                for j in torch.nonzero(acts[b, s]).flatten().tolist():
                    for (code, l, idx, sp), want in _expect(grad_x_input(pre[b, s, j], leaves), b, s, range(L),
                                                            range(L)).items():
                        got = edges.get((b, code, l, idx, sp, Code.RESID, L, j, s, -1))
                        assert got is not None, f"missing resid_in edge {(code, l, idx, sp)} -> R{L}.{j}@{s}"
                        assert got == pytest.approx(want, rel=RTOL, abs=ATOL)
                        checked[code] += 1
    assert checked[Code.TC] > 20 and checked[Code.BIAS_T] > 10, dict(checked)


def test_direct_edges_from_transcoder_nodes_equal_gradient_times_input_per_head(setup):
    """The direct view reads transcoder features, errors and biases where MLP outputs were, per head and source
    position; a bias leaf reaches every source position, so its edges are compared summed over them."""
    model, attn, _, reference, _, tokens, lengths, cache, graph = setup
    edges = edge_dict(graph.direct, EdgeKind.DIRECT)
    H, dh = model.cfg.n_heads, model.cfg.d_head
    checked = defaultdict(int)
    for L in (1, 2):
        sae = attn[L]
        leaves, repl = _leaves(model, attn, reference, cache, range(L), range(L))
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
                        bias_total = defaultdict(float)
                        for s in range(t + 1):
                            for (code, l, j, pos), want in _expect(gx, b, s, range(L), range(L)).items():
                                if code in (Code.BIAS_A, Code.BIAS_T):
                                    bias_total[(code, l)] += edges.get((b, code, l, -1, s, Code.ATTN, L, f, t, h), 0.0)
                                    continue
                                got = edges.get((b, code, l, j, pos, Code.ATTN, L, f, t, h), 0.0)
                                assert got == pytest.approx(want, rel=RTOL, abs=ATOL), (code, l, j, s, t, h)
                                checked[code] += 1
                        for l in range(L):
                            want = float((gx[f"ba{l}"].sum() + gx[f"bo{l}"].sum()).detach())
                            assert bias_total[(Code.BIAS_A, l)] == pytest.approx(want, rel=RTOL, abs=ATOL)
                            assert bias_total[(Code.BIAS_T, l)] == pytest.approx(float(gx[f"bt{l}"].sum()),
                                                                                 rel=RTOL, abs=ATOL)
                            checked[Code.BIAS_T] += 1
    assert checked[Code.TC] > 20 and checked[Code.ERR_T] > 20 and checked[Code.BIAS_T] > 20, dict(checked)
    assert not any(key[1] == Code.MLP for key in edges)


@pytest.mark.parametrize("pruning", [Pruning(), Pruning(top_k=3, min_abs=1e-3, direct_positions=2)])
def test_every_transcoder_feature_sums_to_its_sae_lens_pre_activation(setup, pruning):
    """mlp_in edges + the encoder constant (T.BIAS) + REST = SAELens's pre-activation, at every active feature
    SAELens's encode finds, and at no other."""
    model, attn, resid, reference, transcoders, tokens, lengths, cache, _ = setup
    _, cap = capture(model, tokens, lengths, transcoders)
    graph = full_graph(cap, weights_of(model), attn, resid, pruning, transcoders)
    sums = defaultdict(float)
    e = graph.edges
    for i in torch.nonzero(e.kind == EdgeKind.MLP_IN).flatten().tolist():
        sums[(int(e.prompt[i]), int(e.dst_layer[i]), int(e.dst_index[i]), int(e.dst_pos[i]))] += float(e.value[i])
    want = {}
    for L, tc in reference.items():
        with torch.no_grad():
            pre, acts = _sae_lens_pre(tc, cache[f"blocks.{L}.ln2.hook_normalized"])
        for b in range(len(lengths)):
            for s in range(int(lengths[b])):
                for j in torch.nonzero(acts[b, s]).flatten().tolist():
                    want[(b, L, j, s)] = float(pre[b, s, j])
    assert sums.keys() == want.keys() and len(want) > 30
    for key, value in want.items():
        assert sums[key] == pytest.approx(value, rel=RTOL, abs=ATOL), key
    nodes = graph.nodes
    tc_nodes = nodes.code == Code.TC
    assert int(tc_nodes.sum()) == len(want)
    # and every other decomposed node still sums to its pre-activation, in both views (edges; direct for attention)
    by_target = {name: defaultdict(float) for name in ("edges", "direct")}
    for name in by_target:
        t = getattr(graph, name)
        for i in range(len(t)):
            key = (int(t.prompt[i]), int(t.dst_code[i]), int(t.dst_layer[i]), int(t.dst_index[i]), int(t.dst_pos[i]))
            by_target[name][key] += float(t.value[i])
    checked = 0
    for i in torch.nonzero(~tc_nodes).flatten().tolist():
        b, code, L, f, t = (int(nodes.prompt[i]), int(nodes.code[i]), int(nodes.layer[i]), int(nodes.index[i]),
                            int(nodes.pos[i]))
        sae, hook = (attn[L], f"blocks.{L}.attn.hook_z") if code == Code.ATTN else (resid[L], f"blocks.{L}.hook_resid_pre")
        pre = float(sae.pre_activation(cache[hook][b, t].flatten())[f])
        for name in ("edges", "direct") if code == Code.ATTN else ("edges",):
            assert by_target[name][(b, code, L, f, t)] == pytest.approx(pre, rel=RTOL, abs=ATOL), (name, code, L, f, t)
            checked += 1
    assert checked > 100
    if pruning.top_k is not None:  # pruning removed something from transcoder targets, and REST carries it
        rest = e.value[(e.src_code == Code.REST) & (e.dst_code == Code.TC)]
        assert rest.abs().max() > 1e-3


def test_the_graph_without_transcoders_keeps_mlp_leaves(setup):
    """Transcoders change only the layers they are loaded at: with none, MLP outputs stay leaves."""
    model, attn, resid, _, transcoders, tokens, lengths, _, _ = setup
    _, cap = capture(model, tokens, lengths)
    plain = full_graph(cap, weights_of(model), attn, resid, Pruning())
    assert bool((plain.edges.src_code == Code.MLP).any()) and not bool((plain.edges.kind == EdgeKind.MLP_IN).any())
    with pytest.raises(ValueError, match=r"transcoders at layers \[0, 1, 2\] read the MLP inputs"):
        full_graph(cap, weights_of(model), attn, resid, Pruning(), transcoders)  # a capture without them
    one = {1: transcoders[1]}
    _, cap = capture(model, tokens, lengths, one)
    partial = full_graph(cap, weights_of(model), attn, resid, Pruning(), one)
    src = partial.edges.src_code, partial.edges.src_layer
    assert not bool(((src[0] == Code.MLP) & (src[1] == 1)).any())
    assert bool(((src[0] == Code.MLP) & (src[1] == 0)).any()) and bool(((src[0] == Code.TC) & (src[1] == 1)).any())


@pytest.mark.parametrize("min_abs", [0.0, 0.2])  # 0.2: min_abs binds, as 0.2 / (LN2's 1 / sigma2, ~0.3)
def test_mlp_in_bounds_skip_rows_yet_keep_every_edge(setup, monkeypatch, min_abs):
    """mlp_in's values carry LN2's scale (1 / sigma2 per position), which its Cauchy-Schwarz bound must carry
    too (steps.bounded_values): made to bite (a first pass of three rows), it skips rows, and the graph keeps
    the dense computation's mlp_in edges and values, and every node's REST."""
    from torch.utils.flop_counter import FlopCounterMode

    from ingest.rdfa import steps

    model, attn, resid, _, transcoders, tokens, lengths, _, _ = setup
    _, cap = capture(model, tokens, lengths, transcoders)
    pruning = Pruning(top_k=3, min_abs=min_abs, direct_positions=2)
    with monkeypatch.context() as dense:
        dense.setattr(steps, "BOUNDED", False)
        want = full_graph(cap, weights_of(model), attn, resid, pruning, transcoders)
    monkeypatch.setattr(steps, "FIRST_ROWS", 3)
    skipped = []
    resid_in = steps.resid_in

    def counting(rows, sae, targets, *rest):  # mlp_in's products against those of every target and row
        with FlopCounterMode(display=False) as flops:
            out = resid_in(rows, sae, targets, *rest)
        if sae.kind is NodeKind.TRANSCODER:
            dense = math.prod(targets.index.shape) * rows.vec.shape[2]
            skipped.append(dense - flops.get_total_flops() // (2 * rows.vec.shape[3]))
        return out

    monkeypatch.setattr(steps, "resid_in", counting)
    got = full_graph(cap, weights_of(model), attn, resid, pruning, transcoders)
    assert skipped and sum(skipped) > 0, skipped
    w, g = edge_dict(want.edges, EdgeKind.MLP_IN), edge_dict(got.edges, EdgeKind.MLP_IN)
    assert w.keys() == g.keys() and len(w) > 30
    for key, value in w.items():  # a few rows multiplied first, then the rest: other matmul shapes
        assert g[key] == pytest.approx(value, rel=RTOL, abs=ATOL), key
    torch.testing.assert_close(got.nodes.explained, want.nodes.explained, rtol=RTOL, atol=ATOL)
