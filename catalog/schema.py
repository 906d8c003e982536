"""Plain records the catalog stores and answers with. No torch, no database types.

A *catalog node* is keyed by (model, SAE release, node id without position); its ``uid`` joins
them with '|', e.g. ``toy-ioi|toy-ioi|A2.17`` or ``gpt2-small||EMB`` (components that belong to no
SAE have an empty release). Prompts are keyed by (run, prompt id): ``uid = run/prompt_id``, which
is what makes writes idempotent per (run, prompt).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from catalog.ids import FEATURE_KINDS, NodeRef, format_ref

EDGE_KINDS = ("attn_in", "resid_in", "direct")


def node_uid(model: str, release: str, ref: NodeRef) -> str:
    return f"{model}|{release}|{format_ref(ref.at(None))}"


def split_uid(uid: str) -> tuple[str, str, str]:
    model, release, ref = uid.split("|")
    return model, release, ref


@dataclass(frozen=True)
class NodeInfo:
    """A catalog node: an SAE feature or a component (EMB, POS, MLPl, ATTNl, error, bias)."""

    uid: str
    model: str
    release: str
    ref: str  # canonical id without position, e.g. A2.17, R1.ERR, EMB
    kind: str  # NodeKind value
    layer: int | None
    index: int | None

    @classmethod
    def of(cls, model: str, release: str, ref: NodeRef) -> "NodeInfo":
        r = ref.at(None)
        release = release if (r.is_feature or r.sae_kind is not None) else ""
        return cls(node_uid(model, release, r), model, release, format_ref(r), r.kind.value, r.layer, r.index)

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
    meta: dict = field(default_factory=dict)


@dataclass
class EdgeDelta:
    """Aggregate statistics of one (src, dst, kind) edge over some prompts; deltas add up."""

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

    def rank_key(self) -> tuple:
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


@dataclass
class Batch:
    """Everything one write transaction stores: whole prompts of one run, aggregated."""

    run: str
    prompts: list[Prompt]
    nodes: list[NodeInfo]
    edges: list[EdgeDelta]
    evidence: list[Evidence]
    node_stats: list[NodeStats]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Run:
    run_id: str
    status: str
    manifest: dict
