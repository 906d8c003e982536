"""Response models: what every JSON endpoint answers, so the OpenAPI schema (and /docs) describes each
response. ``extra="forbid"``: a field that ``catalog.queries`` adds without a model here fails the
tests instead of silently leaving the schema behind (the hot endpoints skip validating their answers
in production; ``check_responses``, on in the tests, validates every one). Floats are rounded to 6 significant digits by
``catalog.queries.rnd``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Activation(Model):
    n_positions: int = Field(description="token positions where the feature is active")
    n_prompts: int
    mean: float | None
    max: float | None


class SaeFlags(Model):
    flagged: bool = Field(description="the SAE damaged the model's behaviour when spliced in (eval-saes)")
    logit_diff_recovery: float | None
    kl: float | None
    run: str


class Source(Model):
    id: str = Field(description="the node whose observation fed the activation most (attn_in or resid_in)")
    uid: str
    pos: int = Field(description="the token position it reads from")
    head: int | None
    token: str
    value: float = Field(description="that observation's attribution")


class Context(Model):
    prompt: str = Field(description="prompt uid")
    run: str
    pos: int = Field(description="position of the activating token")
    token: str
    activation: float
    start: int = Field(description="position of the first token in tokens")
    tokens: list[str] = Field(description="the tokens around the activating one")
    source: Source | None = Field(description="the strongest edge into the feature there; null if none was kept")


class HistogramBin(Model):
    low: float
    high: float
    n: int = Field(description="activations in [low, high), over every active position of the runs")


class InputShares(Model):
    features: float | None = Field(description="share from SAE and transcoder features (A, R, T)")
    errors: float | None = Field(description="share from SAE and transcoder error nodes")
    other: float | None = Field(description="share from embeddings, biases and whole MLP or attention outputs")
    total_abs: float = Field(description="summed |value| of the observations counted")
    edges: int = Field(description="incoming edges counted")
    complete: bool = Field(description="false when the node has more incoming edges than one read returns")


class Feature(Model):
    id: str = Field(description="canonical node id, e.g. A5.44256")
    uid: str = Field(description="model|sae|id")
    kind: str
    layer: int | None
    index: int | None
    model: str
    sae: str = Field(description="the SAE's own key: release:sae_id, local:<weights hash>, or empty")
    activation: Activation | None = None
    runs: list[str] = Field(description="the runs whose rows were summed (see catalog.runs)")
    neuronpedia: str | None = None
    sae_flags: SaeFlags | None = None
    contexts: list[Context] = Field(default_factory=list, description="top-activating contexts, strongest first")
    histogram: list[HistogramBin] = Field(default_factory=list, description="activation histogram, 4 bins an octave")
    inputs: InputShares | None = Field(None, description=(
        "where its incoming |attribution| comes from (attn_in, resid_in, mlp_in): features, error nodes, the rest"))


class TokenMatch(Model):
    id: str
    uid: str
    kind: str
    layer: int | None
    model: str
    share: float = Field(description="share of the activation mass of its top activations that sits on the token")
    n_on_token: int
    n_top: int = Field(description="its top activations counted")
    max_on_token: float
    example: dict[str, Any] = Field(description="its strongest activation on the token: prompt uid and position")


class TokenSearch(Model):
    token: str
    runs: list[str]
    features: list[TokenMatch]


class EdgeStatistics(Model):
    edge_kind: str = Field(description="attn_in, resid_in or direct")
    n_prompts: int
    n_obs: int = Field(description="observations: (prompt, source position, destination position, head)")
    sum: float | None
    mean: float | None
    std: float | None
    sum_abs: float | None
    min: float | None
    max: float | None
    sign_share: float | None = Field(description="share of observations with the dominant sign")
    heads: dict[str, float | None] = Field(description="per-head sums (heads with a non-zero sum)")


class Neighbour(EdgeStatistics):
    id: str
    uid: str
    kind: str
    layer: int | None


class NeighbourPage(Model):
    items: list[Neighbour]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class EvidenceRow(Model):
    prompt: str
    text: str | None
    src_pos: int
    src_token: str | None
    dst_pos: int
    dst_token: str | None
    head: int | None
    value: float | None


class RoleShare(Model):
    role: str = Field(description="positional role of the observations (what source position s is to "
                                  "destination t): duplicate, induction, previous, first, offset t-s, or "
                                  "a pair of the prompt's named positions such as S1->END")
    n: int = Field(description="observations of this edge with the role")
    share: float = Field(description="n / the edge's observations")
    abs_share: float = Field(description="their sum of |value| / the edge's sum of |value|")


class EdgeKindAnswer(EdgeStatistics):
    roles: list[RoleShare] = Field(description="positional roles of its attention observations, over all of "
                                               "them (not only the evidence kept); empty for edges without a head")
    evidence: list[EvidenceRow]


class Edge(Model):
    source: str
    target: str
    source_uid: str
    target_uid: str
    runs: list[str] = Field(description="the runs whose rows were summed (see catalog.runs)")
    kinds: list[EdgeKindAnswer]
    sae_flags: dict[str, SaeFlags | None]
    through_flagged_sae: list[str]


class QKSide(Neighbour):
    roles: list[RoleShare] = Field(description="positional roles of the scores it contributed to (s: key "
                                               "position, t: query position)")


class QKPair(Model):
    query: str = Field(description="query-side node (at t)")
    key: str = Field(description="key-side node (at s)")
    value: float = Field(description="this head's summed pairwise terms (attention-score logits)")
    n_prompts: int = Field(description="prompts the pair was kept in (any head)")
    roles_all_heads: list[RoleShare] = Field(description="positional roles of the pair's terms over every head")


class HeadQK(Model):
    head: str
    uid: str
    runs: list[str] = Field(description="the runs whose rows were summed (see catalog.runs)")
    units: str
    query_side: list[QKSide] = Field(description="q_in edges: each query-side node's share of the head's scores")
    key_side: list[QKSide] = Field(description="k_in edges: each key-side node's share of the head's scores")
    pairs: list[QKPair] = Field(description="qk edges of this head: the largest query x key terms")


class Prompt(Model):
    uid: str
    run: str
    prompt_id: str
    text: str
    tokens: list[str]
    corpus: str
    content_hash: str
    meta: dict[str, Any]


class PromptEdge(Model):
    source: str = Field(description="node id at a position, e.g. R1.4@3")
    target: str
    kind: str
    head: int | None
    value: float | None


class PromptGraph(Model):
    prompt: Prompt
    around: str | None
    edges: list[PromptEdge]


class NeuronpediaGraph(BaseModel):
    """Attribution-graph JSON as Neuronpedia and circuit-tracer's frontend read it (docs/api.md)."""

    model_config = ConfigDict(extra="allow")
    metadata: dict[str, Any]
    qParams: dict[str, Any]  # noqa: N815 - the format's own field name
    nodes: list[dict[str, Any]]
    links: list[dict[str, Any]]


class Run(Model):
    run_id: str
    status: str
    manifest: dict[str, Any]


class RunSummary(Model):
    run_id: str
    status: str
    kind: str
    model: str | None
    saes: list[str | None]
    corpus: str | None
    prompts: int | None
    finished: str | None


class TopFeature(Model):
    id: str
    uid: str
    kind: str
    layer: int | None
    degree: int
    total_abs: float | None


class LayerFeatures(Model):
    layer: int
    features: list[TopFeature]


class RunGroup(Model):
    settings: str = Field(description="model, SAEs and pruning the runs share")
    runs: list[str]


class Overview(Model):
    store: str
    counts: dict[str, int]
    runs: list[RunSummary]
    run_groups: list[RunGroup] = Field(description="runs that may be added together; queries never mix groups")
    strongest_attention: list[LayerFeatures]
    selection_error: str | None = Field(None, description="why no strongest features are shown: the stored runs "
                                        "do not share settings and none were chosen (?run=)")


class Exemplar(Model):
    prompt: str
    text: str | None


class DominantRole(Model):
    role: str
    share: float = Field(description="its share of the pattern's |value|")
    base: float = Field(description="its share of the |value| of every attention observation (the null)")


class Position(Model):
    relation: DominantRole | None = Field(description="duplicate, induction, previous or first")
    offset: DominantRole | None = Field(description="t - s, in buckets")
    pair: DominantRole | None = Field(description="the prompt's named positions, source->destination (e.g. S1->END)")


class Pair(Model):
    source: str
    target: str
    path: str = Field(description="direct, or via_resid (through one residual feature), or via_mlp (through one "
                                  "transcoder feature: mlp_in, then direct); k_via_resid / q_via_resid: into a "
                                  "head's key / query side through one residual feature")
    via: list[str] | None = None
    n_prompts: int
    total: float | None
    mean: float | None
    sign_share: float | None
    heads: dict[str, float | None]
    position: Position | None = Field(description="where the attention of the pattern reads (attention hop: "
                                                  "the direct edge, the resid->attn hops of via_resid, or "
                                                  "the direct hops of via_mlp)")
    z_score: float | None
    exemplars: list[Exemplar]


class Chain(Model):
    chain: list[str]
    strength: float | None
    paths: list[str]


class QKChain(Model):
    chain: list[str] = Field(description="A_l.x, head H_L.h, A_L.y, A_M.z")
    paths: list[str] = Field(description="k_via_resid or q_via_resid, writes, then direct or via_resid")
    positions: list[str | None] = Field(description="the dominant role pair of the K/Q hop and of the V hop")
    qk_total: float | None = Field(description="the K/Q pair's total (attention-score logits)")
    head_share: float = Field(description="the head's share of A_L.y's per-head attribution")
    v_total: float | None
    score: float | None = Field(description="|qk_total| x head_share x |v_total|: a ranking, not a quantity")


class Hub(Model):
    id: str
    fed_by: int
    feeds: int


class Patterns(Model):
    runs: list[str] = Field(description="the runs whose rows were summed (see catalog.runs)")
    n_prompts: int
    pairs: list[Pair] = Field(description="V-composition (direct, via_resid, via_mlp), ranked by |total|")
    qk_pairs: list[Pair] = Field(description="K- and Q-composition into heads (k_via_resid, q_via_resid), totals "
                                             "in attention-score logits, ranked by |total|")
    chains: list[Chain]
    qk_chains: list[QKChain] = Field(description="K/Q composition into a head, the head writing an attention "
                                                 "feature, that feature's V composition")
    hubs: list[Hub]
    null: str
    base_rates: dict[str, float] = Field(description="each positional role's share of the |value| of every "
                                                     "attention observation in the runs")
    mined: str | None = Field(description="when the stored result served was mined (UTC, ISO 8601); null when "
                                          "it was mined for this request (none stored, or the runs changed since)")


class Health(Model):
    ok: bool
    store: str
    runs: int


class CypherAnswer(Model):
    rows: list[dict[str, Any]]
    row_cap: int
    truncated: bool


class DiffSide(Model):
    n_prompts: int = Field(description="prompts of the run the edge was observed in")
    n_obs: int = Field(description="observations (evidence) of the edge in the run")
    sum: float | None
    mean: float | None = Field(description="mean attribution per observation")
    per_prompt: float | None = Field(description="sum / prompts of the run: the number compared across runs")


class DiffRow(Model):
    id: str
    uid: str
    kind: str
    layer: int | None
    edge_kind: str
    change: float | None = Field(description="b.per_prompt - a.per_prompt (a side without the edge counts 0)")
    a: DiffSide | None
    b: DiffSide | None


class DiffRun(Model):
    run: str
    prompts: int


class Diff(Model):
    feature: str
    uid: str
    direction: Literal["up", "down"]
    runs: dict[str, DiffRun] = Field(description="a and b")
    same_settings: bool
    settings: dict[str, str] | None = Field(description="each run's model, SAEs and pruning, when they differ")
    n_edges: int = Field(description="edges in either run (the answer shows the first `limit`)")
    edges: list[DiffRow]


class IncompatibleRunsAnswer(Model):
    detail: str
    groups: list[list[str]] = Field(description="run ids that share model, SAEs and pruning")
