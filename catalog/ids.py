"""Node ids: the one written contract every other module uses.

Grammar (case-sensitive; whitespace around a reference is ignored)::

    A{layer}.{index}      attention-output (hook_z) SAE feature        A5.44256
    L{layer}.F{index}     accepted alias for A{layer}.{index}          L5.F44256  -> A5.44256
    R{layer}.{index}      residual-stream (resid_pre) SAE feature      R3.19755
    T{layer}.{index}      transcoder feature (reads the MLP's input, writes its output)  T1.207
    A{layer}.ERR          attention SAE error  (z - reconstruction)    A5.ERR
    R{layer}.ERR          residual SAE error                           R3.ERR
    A{layer}.BIAS         attention SAE bias: as a source, its decoder bias (b_dec W_O + b_O);
                          as an input of A{layer} features, their encoder constant
    R{layer}.BIAS         residual SAE bias, likewise (b_dec; encoder constant)
    T{layer}.ERR          transcoder error (MLP output - reconstruction)    T1.ERR
    T{layer}.BIAS         transcoder bias: as a source its decoder bias b_dec; as an input of
                          T{layer} features, their encoder constant
    EMB, POS              token and position embeddings
    MLP{layer}            MLP output of a layer without a transcoder (a leaf: no linear path back
                          through the nonlinearity)
    ATTN{layer}           attention output of a layer that has no attention SAE (a leaf)
    H{layer}.{head}       an attention head: the target of q_in / k_in edges (QK attribution)  H1.3
    REST                  what pruning removed from one target (per-prompt graphs only)

A per-prompt node appends ``@{pos}`` (a non-negative token position): ``A5.44256@7``, ``R3.ERR@2``.
Features and heads carry an index; component nodes (ERR, BIAS, EMB, POS, MLP, ATTN, REST) never do,
so no component id can collide with a feature id, and kinds never share a prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class NodeKind(StrEnum):
    """What a node is. The value is what stores and JSON carry."""

    ATTN = "attn"  # attention-output SAE feature
    RESID = "resid"  # residual SAE feature
    TRANSCODER = "transcoder"  # transcoder feature: reads an MLP's input (LN2's output), writes its output
    ERROR = "error"
    BIAS = "bias"
    EMB = "emb"
    POS = "pos"
    MLP = "mlp"
    ATTN_OUT = "attn_out"  # whole attention output of a layer without an SAE
    HEAD = "head"  # an attention head (index: the head), whose scores QK attribution explains
    REST = "rest"


FEATURE_KINDS = frozenset({NodeKind.ATTN, NodeKind.RESID, NodeKind.TRANSCODER})
_SAE_PREFIX = {"A": NodeKind.ATTN, "R": NodeKind.RESID, "T": NodeKind.TRANSCODER}
_PREFIX_OF_SAE_KIND = {NodeKind.ATTN: "A", NodeKind.RESID: "R", NodeKind.TRANSCODER: "T"}

_FEATURE = re.compile(r"(?P<p>[ART])(?P<layer>\d+)\.(?P<index>\d+)")
_ALIAS = re.compile(r"L(?P<layer>\d+)\.F(?P<index>\d+)")
_SAE_COMPONENT = re.compile(r"(?P<p>[ART])(?P<layer>\d+)\.(?P<what>ERR|BIAS)")
_LAYER_LEAF = re.compile(r"(?P<what>MLP|ATTN)(?P<layer>\d+)")
_HEAD = re.compile(r"H(?P<layer>\d+)\.(?P<head>\d+)")
_POS = re.compile(r"(?P<body>.+)@(?P<pos>\d+)")


class NodeRefError(ValueError):
    """A node reference that does not parse; the message names it and shows the grammar."""


@dataclass(frozen=True, order=True)
class NodeRef:
    """A parsed node id. ``sae_kind`` is attn/resid/transcoder for ERR and BIAS nodes, else None."""

    kind: NodeKind
    layer: int | None = None
    index: int | None = None
    pos: int | None = None
    sae_kind: NodeKind | None = None

    @property
    def is_feature(self) -> bool:
        return self.kind in FEATURE_KINDS

    def at(self, pos: int | None) -> NodeRef:
        """The same node at a token position (or position-free with None)."""
        return NodeRef(self.kind, self.layer, self.index, pos, self.sae_kind)

    def __str__(self) -> str:
        return format_ref(self)


def attn(layer: int, index: int, pos: int | None = None) -> NodeRef:
    return NodeRef(NodeKind.ATTN, layer, index, pos)


def resid(layer: int, index: int, pos: int | None = None) -> NodeRef:
    return NodeRef(NodeKind.RESID, layer, index, pos)


def transcoder(layer: int, index: int, pos: int | None = None) -> NodeRef:
    return NodeRef(NodeKind.TRANSCODER, layer, index, pos)


def sae_error(sae_kind: NodeKind, layer: int, pos: int | None = None) -> NodeRef:
    return NodeRef(NodeKind.ERROR, layer, None, pos, sae_kind)


def sae_bias(sae_kind: NodeKind, layer: int, pos: int | None = None) -> NodeRef:
    return NodeRef(NodeKind.BIAS, layer, None, pos, sae_kind)


def emb(pos: int | None = None) -> NodeRef:
    return NodeRef(NodeKind.EMB, None, None, pos)


def pos_emb(pos: int | None = None) -> NodeRef:
    return NodeRef(NodeKind.POS, None, None, pos)


def mlp(layer: int, pos: int | None = None) -> NodeRef:
    return NodeRef(NodeKind.MLP, layer, None, pos)


def attn_out(layer: int, pos: int | None = None) -> NodeRef:
    return NodeRef(NodeKind.ATTN_OUT, layer, None, pos)


def head(layer: int, index: int, pos: int | None = None) -> NodeRef:
    return NodeRef(NodeKind.HEAD, layer, index, pos)


REST = NodeRef(NodeKind.REST)


def format_ref(ref: NodeRef) -> str:
    """The canonical id of ``ref`` (inverse of :func:`parse_ref`)."""
    k = ref.kind
    if k in FEATURE_KINDS:
        body = f"{_PREFIX_OF_SAE_KIND[k]}{ref.layer}.{ref.index}"
    elif k in (NodeKind.ERROR, NodeKind.BIAS):
        what = "ERR" if k is NodeKind.ERROR else "BIAS"
        assert ref.sae_kind is not None, "ERR and BIAS nodes name the SAE kind they belong to"
        body = f"{_PREFIX_OF_SAE_KIND[ref.sae_kind]}{ref.layer}.{what}"
    elif k is NodeKind.MLP:
        body = f"MLP{ref.layer}"
    elif k is NodeKind.ATTN_OUT:
        body = f"ATTN{ref.layer}"
    elif k is NodeKind.HEAD:
        body = f"H{ref.layer}.{ref.index}"
    else:
        body = k.name if k is not NodeKind.REST else "REST"
    return body if ref.pos is None else f"{body}@{ref.pos}"


def _parse_body(body: str) -> NodeRef | None:
    if m := _FEATURE.fullmatch(body):
        return NodeRef(_SAE_PREFIX[m["p"]], int(m["layer"]), int(m["index"]))
    if m := _ALIAS.fullmatch(body):
        return NodeRef(NodeKind.ATTN, int(m["layer"]), int(m["index"]))
    if m := _SAE_COMPONENT.fullmatch(body):
        kind = NodeKind.ERROR if m["what"] == "ERR" else NodeKind.BIAS
        return NodeRef(kind, int(m["layer"]), None, None, _SAE_PREFIX[m["p"]])
    if m := _HEAD.fullmatch(body):
        return head(int(m["layer"]), int(m["head"]))
    if m := _LAYER_LEAF.fullmatch(body):
        kind = NodeKind.MLP if m["what"] == "MLP" else NodeKind.ATTN_OUT
        return NodeRef(kind, int(m["layer"]))
    return {"EMB": emb(), "POS": pos_emb(), "REST": REST}.get(body)


GRAMMAR_HINT = (
    "expected A{layer}.{index} (alias L{layer}.F{index}), R{layer}.{index}, T{layer}.{index}, A|R|T{layer}.ERR, "
    "A|R|T{layer}.BIAS, EMB, POS, MLP{layer}, ATTN{layer}, H{layer}.{head} or REST, optionally followed by @{pos}"
)


def parse_ref(text: str) -> NodeRef:
    """Parse a node id such as ``A5.44256``, ``L5.F44256`` or ``R3.ERR@7``.

    Raises NodeRefError naming the text when it does not parse.
    """
    if not isinstance(text, str):
        raise NodeRefError(f"node reference must be a string, got {type(text).__name__}")
    stripped = text.strip()
    pos = None
    body = stripped
    if m := _POS.fullmatch(stripped):
        body, pos = m["body"], int(m["pos"])
    ref = _parse_body(body)
    if ref is None:
        raise NodeRefError(f"cannot parse node reference {text!r}: {GRAMMAR_HINT}")
    return ref.at(pos)


def parse_feature(text: str) -> NodeRef:
    """Parse a reference that must name an SAE or transcoder feature (A…, R… or T…), without a position."""
    ref = parse_ref(text)
    if not ref.is_feature:
        raise NodeRefError(f"{text!r} is not an SAE feature reference: expected A{{layer}}.{{index}}, "
                           "L{layer}.F{index}, R{layer}.{index} or T{layer}.{index}")
    if ref.pos is not None:
        raise NodeRefError(f"{text!r} names a position; a catalog feature reference has none")
    return ref


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


SEGMENT_NAME = re.compile(RUN_NAME.pattern + r"~\d{4}")


def segment_name(run: str, k: int) -> str:
    """The store's name of segment ``k`` of ``run`` (``ingest --publish-every``): a '~' no run name holds, so a
    segment never collides with a run a user names."""
    return f"{run}~{k:04d}"


def check_stored_run_name(name: str) -> str:
    """What a store accepts as a run id: a run name, or a segment of one (segment_name)."""
    if isinstance(name, str) and SEGMENT_NAME.fullmatch(name):
        return name
    return check_run_name(name)


def check_run_name(name: str) -> str:
    """A run name: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit. No '/': a
    prompt's uid is ``run/prompt id``, so a '/' in run names would let run ``a`` with prompt ``b/0`` and run
    ``a/b`` with prompt ``0`` name the same prompt."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        text = str(name)
        shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}... ({len(text)} characters)"
        raise ValueError(f"run name {shown} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return name
