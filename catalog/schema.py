"""Plain records the catalog stores and answers with. No torch, no database types.

A *catalog node* is keyed by (model, the SAE it belongs to, node id without position); its ``uid``
joins them with '|', e.g. ``toy-ioi|toy-ioi:blocks.2.attn.hook_z|A2.17`` or ``gpt2-small||EMB``
(components that belong to no SAE have an empty SAE key). An SAE's key is ``release:sae_id`` for a
registry SAE and ``local:<weights hash>`` for a folder on disk (see ``ingest.saes.LoadedSae.key``), so
two SAEs of one release at the same hook never share features. Prompts are keyed by (run, prompt id):
``uid = run/prompt_id``, which is what makes writes idempotent per (run, prompt).

Stores number nodes with small integers (a node dictionary per catalog) and key edges with one int64
built by :func:`edge_key` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from catalog.ids import FEATURE_KINDS, NodeRef, format_ref

JSON = dict[str, Any]  # an answer on its way to JSON: keys are field names

# an edge kind's code is its index here; mlp_in: into a transcoder feature (ingest/rdfa/graph.py)
EDGE_KINDS = ("attn_in", "resid_in", "direct", "q_in", "k_in", "qk", "mlp_in")
ATTENTION_KINDS = ("attn_in", "direct")  # edges that read through a head (V-composition)
QK_KINDS = ("q_in", "k_in", "qk")  # QK attribution of attention scores (positions: key s, query t)
NODE_ID_LIMIT = 1 << 29  # node dictionary ids stay below this, so edge keys (2^58 x 7 kinds) fit in an int64

# What a feature fires on: each feature keeps, per run, its TOP_ACTIVATIONS strongest activations (prompt,
# position; ties by prompt uid, then position) and a histogram of every activation. A histogram bin is the
# activation's float32 bit pattern shifted right by HIST_SHIFT: 2^(23 - HIST_SHIFT) = 4 bins per octave,
# fixed for every feature and run, so histograms add exactly across windows, shards and runs.
TOP_ACTIVATIONS = 20
HIST_SHIFT = 21


# Positional roles of an attention observation: what the source position s is to the destination
# position t (attention from t to s). A role's code is its index in ROLES; an observation may have
# several (e.g. previous and duplicate). Relations come from the tokens, offsets from t - s, and role
# pairs ("S1->END": s is S1, t is END) from a prompt's meta, which names positions as <role>_pos.
RELATIONS = ("duplicate",  # the token at s is the token at t (s < t)
             "induction",  # the token before s is the token at t
             "previous",  # s = t - 1
             "first")  # s = 0
OFFSETS = ("offset 0", "offset 1", "offset 2", "offset 3", "offset 4-7", "offset 8-15", "offset 16+")
PROMPT_ROLES = ("IO", "S1", "S2", "END")  # meta io_pos, s1_pos, s2_pos, end_pos (IOI)
ROLE_PAIRS = tuple(f"{a}->{b}" for a in PROMPT_ROLES for b in PROMPT_ROLES)
ROLES = RELATIONS + OFFSETS + ROLE_PAIRS


def node_uid(model: str, sae: str, ref: NodeRef) -> str:
    return f"{model}|{sae}|{format_ref(ref.at(None))}"


def edge_key(src_id: Any, dst_id: Any, kind_code: Any) -> Any:
    """The int64 key of edge (src, dst, kind) from node dictionary ids and the kind's code; works on
    ints and on numpy int64 arrays alike. The one place edge keys are built."""
    return (np.asarray(src_id, dtype=np.int64) * NODE_ID_LIMIT + dst_id) * len(EDGE_KINDS) + kind_code


@dataclass(frozen=True)
class NodeInfo:
    """A catalog node: an SAE feature or a component (EMB, POS, MLPl, ATTNl, error, bias)."""

    uid: str
    model: str
    sae: str  # key of the SAE the node belongs to ("" for EMB, POS, MLP, ATTN): release:sae_id or local:<hash>
    ref: str  # canonical id without position, e.g. A2.17, R1.ERR, EMB
    kind: str  # NodeKind value
    layer: int | None
    index: int | None

    @classmethod
    def of(cls, model: str, sae: str, ref: NodeRef) -> NodeInfo:
        r = ref.at(None)
        sae = sae if (r.is_feature or r.sae_kind is not None) else ""
        return cls(node_uid(model, sae, r), model, sae, format_ref(r), r.kind.value, r.layer, r.index)

    @property
    def is_feature(self) -> bool:
        return self.kind in {k.value for k in FEATURE_KINDS}


@dataclass
class Prompt:
    """One prompt of a run, with its tokens as the model's tokenizer spells them."""

    uid: str
    run: str
    prompt_id: str
    text: str
    tokens: list[str]
    corpus: str
    content_hash: str
    meta: JSON = field(default_factory=dict)


@dataclass
class EdgeStats:
    """Aggregate statistics of one (src, dst, kind) edge over some prompts: the stored totals, or what
    a window adds to them (both add up the same way)."""

    src: str
    dst: str
    kind: str
    n_prompts: int
    n_obs: int
    sum: float
    sumsq: float
    sum_abs: float
    min: float
    max: float
    n_pos: int
    head_sums: dict[int, float] = field(default_factory=dict)
    # per positional role (catalog.schema.ROLES) of its attention observations: (count, sum of |value|);
    # filled by the reads that need it (edge detail, all_edges), empty elsewhere
    roles: dict[str, tuple[int, float]] = field(default_factory=dict)

    @classmethod
    def of(cls, src: str, dst: str, stats: Sequence[Any], head_sums: dict[int, float],
           roles: dict[str, tuple[int, float]] | None = None) -> EdgeStats:
        """From a stored row's nine statistics, in field order (kind, n_prompts, ..., n_pos)."""
        kind, n_prompts, n_obs, total, sumsq, sum_abs, low, high, n_pos = stats
        return cls(src, dst, kind, n_prompts, n_obs, total, sumsq, sum_abs, low, high, n_pos, head_sums, roles or {})

    @property
    def key(self) -> str:
        return f"{self.src}>{self.dst}>{self.kind}"


class Evidence(NamedTuple):
    """One observation behind an aggregated edge: where, through which head, how much.
    (A NamedTuple: batches create hundreds of thousands of these.)"""

    src: str
    dst: str
    kind: str
    prompt: str
    src_pos: int
    dst_pos: int
    head: int | None
    value: float

    @property
    def edge_key(self) -> str:
        return f"{self.src}>{self.dst}>{self.kind}"

    def rank_key(self) -> tuple[float, str, int, int, int]:
        """Order of evidence kept per edge: largest |value| first, ties broken deterministically."""
        return (-abs(self.value), self.prompt, self.src_pos, self.dst_pos, -1 if self.head is None else self.head)


@dataclass
class NodeStats:
    """Activation statistics of a feature over some prompts; deltas add up."""

    uid: str
    n_obs: int
    n_prompts: int
    sum_act: float
    max_act: float


@dataclass(frozen=True)
class TopActivation:
    """One of a feature's strongest activations, with the observation that fed it most: the strongest
    attn_in (attention feature) or resid_in (residual feature) edge into it at that prompt and position
    (``src`` None when no edge into it was kept)."""

    prompt: str  # prompt uid
    pos: int
    act: float
    token: str
    run: str
    src: str | None  # node uid of the strongest source
    src_pos: int
    head: int  # -1 where no head applies
    value: float

    def order_key(self) -> tuple[float, str, int]:
        """The total order of a feature's activations: strongest first, then prompt uid, then position."""
        return (-self.act, self.prompt, self.pos)


def hist_edges(bin_code: int) -> tuple[float, float]:
    """[low, high) of histogram bin ``bin_code`` (see HIST_SHIFT)."""
    edges = np.array([bin_code << HIST_SHIFT, (bin_code + 1) << HIST_SHIFT], np.int64).astype(np.int32).view(np.float32)
    return float(edges[0]), float(edges[1])


@dataclass
class Run:
    run_id: str
    status: str
    manifest: JSON
