"""NodeSlots names every slot of a run with the catalog node that catalog.schema.NodeInfo.of builds."""

import numpy as np

from catalog.ids import NodeKind, attn, attn_out, emb, head, mlp, pos_emb, resid, sae_bias, sae_error, transcoder
from catalog.schema import NodeInfo
from ingest.to_catalog import NodeSlots, SaeKeys


def test_every_slot_is_the_canonical_node():
    saes = SaeKeys(attn={0: ("ka0", 5), 2: ("ka2", 12)}, resid={1: ("kr1", 3)}, transcoders={1: ("kt1", 4)})
    slots = NodeSlots("m", n_layers=3, saes=saes, n_heads=2)
    want = [NodeInfo.of("m", "ka0", attn(0, i)) for i in range(5)] + \
        [NodeInfo.of("m", "ka2", attn(2, i)) for i in range(12)] + \
        [NodeInfo.of("m", "kr1", resid(1, i)) for i in range(3)] + \
        [NodeInfo.of("m", k, f(NodeKind.ATTN, layer)) for layer, k in ((0, "ka0"), (2, "ka2"))
         for f in (sae_error, sae_bias)] + \
        [NodeInfo.of("m", "kr1", f(NodeKind.RESID, 1)) for f in (sae_error, sae_bias)] + \
        [NodeInfo.of("m", "kt1", transcoder(1, i)) for i in range(4)] + \
        [NodeInfo.of("m", "kt1", f(NodeKind.TRANSCODER, 1)) for f in (sae_error, sae_bias)] + \
        [NodeInfo.of("m", "", head(layer, h)) for layer in (0, 2) for h in range(2)] + \
        [NodeInfo.of("m", "", r) for r in (emb(), pos_emb(), attn_out(1), mlp(0), mlp(2))]  # MLP1: its transcoder
    got = [slots.info(s) for s in reversed(range(slots.size))]  # any order: blocks are built on first use
    assert sorted(got, key=lambda n: n.uid) == sorted(want, key=lambda n: n.uid)
    assert "m|ka2|A2.11" in {n.uid for n in got}  # a two-digit index keeps both digits


def test_bulk_lookup_names_the_same_nodes_as_one_at_a_time_in_any_order_and_repeated():
    saes = SaeKeys(attn={0: ("ka0", 5)}, resid={1: ("kr1", 3)})
    slots = NodeSlots("m", n_layers=2, saes=saes, n_heads=2)
    one = NodeSlots("m", n_layers=2, saes=saes, n_heads=2)
    order = np.random.default_rng(0).permutation(slots.size)
    first = slots.infos(order[: slots.size // 2])
    both = slots.infos(np.r_[order, order[:3]])  # half already built, half new, three repeated
    assert first == [one.info(int(s)) for s in order[: slots.size // 2]]
    assert both == [one.info(int(s)) for s in np.r_[order, order[:3]]]
    assert slots.infos(np.zeros(0, np.int64)) == []
