import pytest

from catalog.ids import (
    REST,
    NodeKind,
    NodeRefError,
    attn,
    attn_out,
    emb,
    format_ref,
    head,
    mlp,
    parse_feature,
    parse_ref,
    pos_emb,
    resid,
    sae_bias,
    sae_error,
    transcoder,
)

ALL = [attn(5, 44256), resid(3, 19755), sae_error(NodeKind.ATTN, 2), sae_error(NodeKind.RESID, 0),
       sae_bias(NodeKind.ATTN, 11), sae_bias(NodeKind.RESID, 4), emb(), pos_emb(), mlp(7), attn_out(3), head(1, 3),
       REST, transcoder(1, 207), sae_error(NodeKind.TRANSCODER, 1), sae_bias(NodeKind.TRANSCODER, 0)]


@pytest.mark.parametrize("ref", ALL + [r.at(9) for r in ALL if r.kind is not NodeKind.REST])
def test_round_trip(ref):
    assert parse_ref(format_ref(ref)) == ref


def test_written_forms():
    assert [format_ref(r) for r in ALL] == ["A5.44256", "R3.19755", "A2.ERR", "R0.ERR", "A11.BIAS", "R4.BIAS", "EMB",
                                             "POS", "MLP7", "ATTN3", "H1.3", "REST", "T1.207", "T1.ERR", "T0.BIAS"]
    assert format_ref(attn(5, 1, 12)) == "A5.1@12"


def test_seed_alias_is_the_attention_feature():
    assert parse_ref("L5.F44256") == attn(5, 44256)
    assert parse_feature(" L5.F44256 ") == attn(5, 44256)


def test_no_component_collides_with_a_feature():
    ids = {format_ref(r) for r in ALL}
    assert len(ids) == len(ALL)
    for layer in range(3):
        feats = {format_ref(f(layer, i)) for f in (attn, resid, transcoder) for i in range(50)}
        comps = {format_ref(f(k, layer)) for f in (sae_error, sae_bias)
                 for k in (NodeKind.ATTN, NodeKind.RESID, NodeKind.TRANSCODER)} | {format_ref(mlp(layer))}
        assert not feats & comps


@pytest.mark.parametrize("bad", ["A5", "A5.x", "L5.44256", "Q1.2", "", "A5.3@-1", "MLP", "A5.3@", "EMB@x", "H1",
                                 "H1.x", "H.2", "T1", "T1.x", "TR1.2", "T1.ERR.2"])
def test_bad_references_are_named(bad):
    with pytest.raises(NodeRefError, match="cannot parse node reference") as exc:
        parse_ref(bad)
    assert repr(bad) in str(exc.value)


def test_feature_reference_must_be_a_feature():
    with pytest.raises(NodeRefError, match="not an SAE feature"):
        parse_feature("MLP3")
