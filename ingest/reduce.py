"""Device-side reduction: RDFA observations -> partial aggregates -> one window aggregate.

Everything here is sort/segment arithmetic on int64 keys (``ingest.segments``), on the device that
ran RDFA (CUDA when present); no per-observation or per-edge Python object is made. A batch's
observations reduce to a :class:`Partial`; partials of one window merge into one (the merge is
associative and commutative: counts add, sums add in float64, min/max take min/max, evidence keeps the
top N by a total order), so a window's aggregate does not depend on the order of the batches inside
it, and shards or workers that split a corpus reduce to the same catalog.

Node slots are dense ints for every node a run can produce (``ingest.to_catalog.NodeSlots``); an
edge's local key is ``(src_slot * n_slots + dst_slot) * n_kinds + kind``. A Partial's per-head,
per-role and evidence rows name their edge by its row in ``edge_key``, so sorting them needs only as
many bits as a window has edges.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from catalog.schema import EDGE_KINDS, HIST_SHIFT, TOP_ACTIVATIONS
from ingest.roles import ROLE_SLOTS
from ingest.segments import (
    bits_of,
    dense_unique_inverse,
    order_by,
    segment_count,
    segment_extreme,
    segment_sum,
    unique_inverse,
)

N_KINDS = len(EDGE_KINDS)
# what a top activation's source is read from: the edges that partition a feature's pre-activation
FEEDING_KINDS = (EDGE_KINDS.index("attn_in"), EDGE_KINDS.index("resid_in"), EDGE_KINDS.index("mlp_in"))
HIST_BINS = 1 << (32 - HIST_SHIFT)  # bin codes of non-negative float32 values
HEAD_SLOTS = 256  # heads per layer a catalog can name
POS_LIMIT = 1 << 12  # token positions must fit the evidence tie-break key (12 bits each)


@dataclass
class Observations:
    """One batch's edges, one row per (prompt, src@pos, dst@pos, kind, head); tensors on one device."""

    prompt: torch.Tensor  # int64 [n] row of the prompt in its window
    src: torch.Tensor  # int64 [n] node slot
    dst: torch.Tensor  # int64 [n] node slot
    kind: torch.Tensor  # int64 [n] index into EDGE_KINDS
    head: torch.Tensor  # int64 [n], -1 where no head applies
    src_pos: torch.Tensor  # int64 [n]
    dst_pos: torch.Tensor  # int64 [n]
    value: torch.Tensor  # float32 or float64 [n]
    # positional roles (ingest.roles.role_rows): observation row and role code, [k] each; None: none
    role_row: torch.Tensor | None = None
    role_code: torch.Tensor | None = None


@dataclass
class Activations:
    """Decomposed nodes of one batch: where each feature was active and how much."""

    node: torch.Tensor  # int64 [a] node slot
    prompt: torch.Tensor  # int64 [a] row of the prompt in its window
    act: torch.Tensor  # float [a]
    pos: torch.Tensor | None = None  # int64 [a] token position; None: unknown, so no top activations are kept


@dataclass
class Partial:
    """Aggregates of some prompts of one window: edges keyed by sorted unique int64 keys, and rows
    per (edge, head), per (edge, role) and of evidence that name their edge by its row in edge_key."""

    edge_key: torch.Tensor  # int64 [m] sorted, unique
    n_prompts: torch.Tensor  # int64 [m]
    n_obs: torch.Tensor  # int64 [m]
    sum: torch.Tensor  # float64 [m]
    sumsq: torch.Tensor  # float64 [m]
    sum_abs: torch.Tensor  # float64 [m]
    min: torch.Tensor  # float64 [m]
    max: torch.Tensor  # float64 [m]
    n_pos: torch.Tensor  # int64 [m]
    head_edge: torch.Tensor  # int64 [h] row in edge_key; (head_edge, head) sorted, unique
    head: torch.Tensor  # int64 [h]
    head_sum: torch.Tensor  # float64 [h]
    role_edge: torch.Tensor  # int64 [r] row in edge_key; (role_edge, role) sorted, unique
    role: torch.Tensor  # int64 [r] role code (catalog.schema.ROLES)
    role_n: torch.Tensor  # int64 [r] observations of the edge with that role
    role_abs: torch.Tensor  # float64 [r] their sum of |value|
    ev_edge: torch.Tensor  # int64 [e] row in edge_key, ascending: each edge's top-N rows in the evidence order
    ev_prompt: torch.Tensor  # int64 [e]
    ev_src_pos: torch.Tensor  # int64 [e]
    ev_dst_pos: torch.Tensor  # int64 [e]
    ev_head: torch.Tensor  # int64 [e]
    ev_value: torch.Tensor  # float64 [e]
    node: torch.Tensor  # int64 [a] node slot, sorted, unique
    node_n_obs: torch.Tensor  # int64 [a]
    node_n_prompts: torch.Tensor  # int64 [a]
    node_sum_act: torch.Tensor  # float64 [a]
    node_max_act: torch.Tensor  # float64 [a]
    top_node: torch.Tensor  # int64 [t] node slot, ascending: each node's top activations, strongest first
    top_prompt: torch.Tensor  # int64 [t]
    top_pos: torch.Tensor  # int64 [t]
    top_act: torch.Tensor  # float64 [t]
    top_src: torch.Tensor  # int64 [t] slot of the strongest attn_in / resid_in / mlp_in observation into it, -1: none
    top_src_pos: torch.Tensor  # int64 [t]
    top_head: torch.Tensor  # int64 [t]
    top_value: torch.Tensor  # float64 [t]
    hist_node: torch.Tensor  # int64 [g] node slot; (hist_node, hist_bin) sorted, unique
    hist_bin: torch.Tensor  # int64 [g] bin code (catalog.schema.HIST_SHIFT)
    hist_n: torch.Tensor  # int64 [g]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).numel() * 8 for f in fields(self))

    def to(self, device) -> Partial:
        return Partial(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def edge_keys(obs: Observations, n_slots: int) -> torch.Tensor:
    """Local int64 key of each observation's (src, dst, kind)."""
    return (obs.src * n_slots + obs.dst) * N_KINDS + obs.kind


def reduce_batch(obs: Observations, acts: Activations, prompt_rank: torch.Tensor, n_slots: int,
                 cap: int | None) -> Partial:
    """Aggregate one batch. ``prompt_rank`` [window prompts] orders prompts by uid (evidence ties);
    ``cap``: evidence kept per edge (None: all)."""
    if len(obs.prompt) and int(torch.maximum(obs.src_pos.max(), obs.dst_pos.max())) >= POS_LIMIT:
        raise ValueError(f"positions past {POS_LIMIT - 1} do not fit the evidence key")
    uniq, inv = unique_inverse(edge_keys(obs, n_slots), bits_of(n_slots * n_slots * N_KINDS - 1))
    m = len(uniq)
    v = obs.value.double()
    has_head = (obs.head >= 0).nonzero().squeeze(1)  # indices: a mask would be resolved once per use
    head_edge, head, hinv = _pairs(inv.index_select(0, has_head), obs.head.index_select(0, has_head), m, HEAD_SLOTS)
    role_row = obs.role_row if obs.role_row is not None else inv.new_zeros(0)
    role_code = obs.role_code if obs.role_code is not None else inv.new_zeros(0)
    role_edge, role, rinv = _pairs(inv.index_select(0, role_row), role_code, m, ROLE_SLOTS)
    keep = top_evidence(inv, m, obs.value, prompt_rank.index_select(0, obs.prompt), obs.src_pos, obs.dst_pos,
                        obs.head, cap, contend=True)
    nodes, ninv = unique_inverse(acts.node, bits_of(n_slots))
    act = acts.act.double()
    a = len(nodes)
    tops = _top_activations(obs, acts, prompt_rank, n_slots)
    absv = v.abs()
    positive = (v > 0).nonzero().squeeze(1)
    return Partial(
        uniq, _distinct_prompts(inv, obs.prompt, m, len(prompt_rank)), segment_count(inv, m),
        segment_sum(inv, v, m), segment_sum(inv, v * v, m), segment_sum(inv, absv, m),
        segment_extreme(inv, v, m, "amin"), segment_extreme(inv, v, m, "amax"),
        segment_count(inv.index_select(0, positive), m),
        head_edge, head, segment_sum(hinv, v.index_select(0, has_head), len(head)),
        role_edge, role, segment_count(rinv, len(role)), segment_sum(rinv, absv.index_select(0, role_row), len(role)),
        *(x.index_select(0, keep) for x in (inv, obs.prompt, obs.src_pos, obs.dst_pos, obs.head, v)),
        nodes, segment_count(ninv, a), _distinct_prompts(ninv, acts.prompt, a, len(prompt_rank)),
        segment_sum(ninv, act, a), segment_extreme(ninv, act, a, "amax"),
        *tops, *_histogram(acts.node, _bin_codes(acts.act), torch.ones_like(acts.node), n_slots))


def merge(parts: list[Partial], prompt_rank: torch.Tensor, cap: int | None) -> Partial:
    """One Partial for prompts that ``parts`` hold between them (each prompt in one part only)."""
    if len(parts) == 1:
        return parts[0]
    cat = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Partial)}
    uniq, inv = unique_inverse(cat["edge_key"], bits_of(cat["edge_key"]))
    m = len(uniq)
    starts = [0]
    for p in parts[:-1]:
        starts.append(starts[-1] + len(p.edge_key))
    # each part's child rows name its own edge rows: shift them into the concatenation, then map to uniq
    edge_of = {c: inv.index_select(0, torch.cat([getattr(p, c) + s for p, s in zip(parts, starts)]))
               for c in ("head_edge", "role_edge", "ev_edge")}
    head_edge, head, hinv = _pairs(edge_of["head_edge"], cat["head"], m, HEAD_SLOTS)
    role_edge, role, rinv = _pairs(edge_of["role_edge"], cat["role"], m, ROLE_SLOTS)
    keep = top_evidence(edge_of["ev_edge"], m, cat["ev_value"], prompt_rank.index_select(0, cat["ev_prompt"]),
                        cat["ev_src_pos"], cat["ev_dst_pos"], cat["ev_head"], cap)
    nodes, ninv = unique_inverse(cat["node"], bits_of(cat["node"]))
    a = len(nodes)
    return Partial(
        uniq, *(segment_sum(inv, cat[c], m) for c in ("n_prompts", "n_obs", "sum", "sumsq", "sum_abs")),
        segment_extreme(inv, cat["min"], m, "amin"), segment_extreme(inv, cat["max"], m, "amax"),
        segment_sum(inv, cat["n_pos"], m),
        head_edge, head, segment_sum(hinv, cat["head_sum"], len(head)),
        role_edge, role, segment_sum(rinv, cat["role_n"], len(role)), segment_sum(rinv, cat["role_abs"], len(role)),
        edge_of["ev_edge"].index_select(0, keep),
        *(cat[c].index_select(0, keep) for c in ("ev_prompt", "ev_src_pos", "ev_dst_pos", "ev_head", "ev_value")),
        nodes, *(segment_sum(ninv, cat[c], a) for c in ("node_n_obs", "node_n_prompts", "node_sum_act")),
        segment_extreme(ninv, cat["node_max_act"], a, "amax"),
        *_merge_tops(cat, prompt_rank),
        *_histogram(cat["hist_node"], cat["hist_bin"], cat["hist_n"], int(cat["node"].max()) + 1 if a else 1))


_TOPS = ("top_node", "top_prompt", "top_pos", "top_act", "top_src", "top_src_pos", "top_head", "top_value")


def _top_activations(obs: Observations, acts: Activations, prompt_rank: torch.Tensor,
                     n_slots: int) -> tuple[torch.Tensor, ...]:
    """The Partial's top_* columns: each node's TOP_ACTIVATIONS strongest activations (act descending,
    then prompt rank, then position) and, for each, the strongest attn_in / resid_in / mlp_in observation into that
    node at that prompt and position (|value| descending, then source slot, source position, head)."""
    rows = acts.node.new_zeros(0) if acts.pos is None else _top_rows(acts.node, acts.act, prompt_rank.index_select(
        0, acts.prompt), acts.pos, TOP_ACTIVATIONS)
    node, prompt, act = (x.index_select(0, rows) for x in (acts.node, acts.prompt, acts.act))
    pos = acts.pos.index_select(0, rows) if acts.pos is not None else rows
    # each kept activation's key, sorted; observations into it are found by binary search
    key = (prompt * n_slots + node) * POS_LIMIT + pos
    sorted_key, by_key = torch.sort(key)
    is_feeding = obs.kind == FEEDING_KINDS[0]
    for kind in FEEDING_KINDS[1:]:  # or-ed comparisons: torch.isin took 6.3 ms for 400k observations here, these 1.3
        is_feeding |= obs.kind == kind
    feeding = is_feeding.nonzero().squeeze(1)
    okey = (obs.prompt.index_select(0, feeding) * n_slots + obs.dst.index_select(0, feeding)) * POS_LIMIT + \
        obs.dst_pos.index_select(0, feeding)
    at = torch.searchsorted(sorted_key, okey).clamp(max=max(len(key) - 1, 0))
    hit = (sorted_key.index_select(0, at) == okey).nonzero().squeeze(1) if len(key) else at[:0]
    obs_rows, group = feeding.index_select(0, hit), at.index_select(0, hit)
    src, src_pos, head = (x.index_select(0, obs_rows) for x in (obs.src, obs.src_pos, obs.head))
    best = top_evidence(group, len(key), obs.value.index_select(0, obs_rows), src, src_pos,
                        obs.dst_pos.index_select(0, obs_rows), head, 1)
    target = by_key.index_select(0, group.index_select(0, best))  # the kept activation each best row feeds
    out_src = torch.full_like(node, -1).index_copy_(0, target, src.index_select(0, best))
    out_pos = torch.zeros_like(node).index_copy_(0, target, src_pos.index_select(0, best))
    out_head = torch.full_like(node, -1).index_copy_(0, target, head.index_select(0, best))
    out_value = torch.zeros(len(node), dtype=torch.float64, device=node.device).index_copy_(
        0, target, obs.value.index_select(0, obs_rows.index_select(0, best)).double())
    return node, prompt, pos, act.double(), out_src, out_pos, out_head, out_value


def _top_rows(node: torch.Tensor, act: torch.Tensor, rank: torch.Tensor, pos: torch.Tensor, cap: int) -> torch.Tensor:
    """Row indices of each node's ``cap`` strongest activations, by node ascending, then act descending,
    then ``rank`` (the prompt's), then position."""
    group, dense = unique_inverse(node, bits_of(node))
    return top_evidence(dense, len(group), act, rank, pos, torch.zeros_like(pos), torch.full_like(pos, -1), cap)


def _merge_tops(cat: dict[str, torch.Tensor], prompt_rank: torch.Tensor) -> tuple[torch.Tensor, ...]:
    keep = _top_rows(cat["top_node"], cat["top_act"], prompt_rank.index_select(0, cat["top_prompt"]), cat["top_pos"],
                     TOP_ACTIVATIONS)
    return tuple(cat[c].index_select(0, keep) for c in _TOPS)


def _bin_codes(act: torch.Tensor) -> torch.Tensor:
    """[a] int64 histogram bin of each activation: its float32 bit pattern >> HIST_SHIFT (0 for act <= 0)."""
    return (act.float().clamp(min=0).view(torch.int32) >> HIST_SHIFT).long()


def _histogram(node: torch.Tensor, bin_code: torch.Tensor, n: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, ...]:
    """(node, bin, count) rows, sorted and unique, of ``n`` [k] activations counted at (node, bin_code)."""
    pairs, inv = unique_inverse(node * HIST_BINS + bin_code, bits_of(n_slots * HIST_BINS - 1))
    return pairs // HIST_BINS, pairs % HIST_BINS, segment_sum(inv, n, len(pairs))


def top_evidence(group: torch.Tensor, n_groups: int, value: torch.Tensor, rank: torch.Tensor,
                 src_pos: torch.Tensor, dst_pos: torch.Tensor, head: torch.Tensor, cap: int | None,
                 contend: bool = False) -> torch.Tensor:
    """Row indices of the top-``cap`` rows of each group, grouped by group ascending. ``group`` [n]:
    each row's dense group (edge) in [0, n_groups); ``value`` [n] float32 or float64. Order within a
    group: |value| descending, then prompt rank, source position, destination position, head (-1
    first): the total order of ``catalog.schema.Evidence.rank_key``, so the rows kept never depend on
    input order. |value| is sorted as the bit pattern of a non-negative float (which orders like the
    float): 31 bits where every value is a float32 (RDFA's are), 63 otherwise. ``contend``: leave out the
    rows that cannot be kept before sorting (``_contenders``); for raw observations, not for rows that were
    kept already (a merge's partials each hold their edges' top rows, and the filter keeps ~90% of those)."""
    rows = _contenders(group, value, n_groups, cap) if contend else None  # sort only the rows that can be kept
    if rows is not None:
        group, value, rank, src_pos, dst_pos, head = (x.index_select(0, rows) for x in (group, value, rank, src_pos,
                                                                                         dst_pos, head))
    tie = (rank << 32) | (src_pos << 20) | (dst_pos << 8) | (head + 1)
    desc, value_bits = _descending(value)
    order = order_by([(group, bits_of(n_groups - 1)), (desc, value_bits), (tie, bits_of(tie))])
    if cap is None:
        return order
    counts = segment_count(group, n_groups)  # of the rows sorted
    first = torch.cumsum(counts, 0) - counts
    within = torch.arange(len(order), device=group.device) - first.index_select(0, group.index_select(0, order))
    keep = order[within < cap]
    return keep if rows is None else rows.index_select(0, keep)


CONTEND_ROWS = 1 << 14  # below this the sort is cheap and the filter's table is not worth it


def _contenders(group: torch.Tensor, value: torch.Tensor, n_groups: int, cap: int | None) -> torch.Tensor | None:
    """Row indices [c] (ascending) of the rows that can be among their group's top ``cap`` by |value|, or None
    (every row) where filtering would not pay: most rows in groups of at most ``cap`` rows, which keep all.
    Each group's rows are dealt into ``cap`` classes by row number; the class maxima are |values| of ``cap``
    distinct rows, so the smallest of them is at most the group's cap-th largest |value|, and a row below it
    has ``cap`` rows ahead of it in the evidence order. Rows at the bound stay (the order breaks ties); a
    group with an empty class has bound 0 and keeps every row. A GPT-2-shaped prompt keeps 402k of 877k
    observations, and the evidence sort of those takes half the time of all."""
    if cap is None or len(group) <= CONTEND_ROWS or n_groups * cap > 4 * len(group):  # the table: bounded by the rows
        return None
    counts = segment_count(group, n_groups)
    if int(counts[counts > cap].sum()) * 2 < len(group):
        return None
    absval = value.abs()
    deal = torch.arange(len(group), device=group.device) % cap
    largest = segment_extreme(group * cap + deal, absval, n_groups * cap, "amax")  # 0 for an empty class
    bound = largest.view(n_groups, cap).amin(1)
    return (~(absval < bound.index_select(0, group))).nonzero().squeeze(1)  # NaN compares False: kept


def _descending(value: torch.Tensor) -> tuple[torch.Tensor, int]:
    """An int64 >= 0 per row that orders ascending as |value| does descending, and its bits."""
    absval = value.abs()
    narrow = absval.float()
    if value.dtype == torch.float32 or bool((narrow.double() == absval).all()):
        return ((1 << 31) - 1) - narrow.view(torch.int32).long(), 31
    return ((1 << 63) - 1) - absval.double().view(torch.int64), 63


def _pairs(edge: torch.Tensor, sub: torch.Tensor, m: int, slots: int) -> tuple[torch.Tensor, ...]:
    """Distinct (edge, sub) pairs, sorted, of rows naming an edge row in [0, m) and a sub-index in
    [0, slots): (edge [k], sub [k], each row's place among them [n])."""
    used = int(sub.max()) + 1 if len(sub) else 1  # heads a layer has, roles seen: fewer than the slots
    if m * used <= 4 * len(sub) + (1 << 20):  # a table of every (edge, sub) is about as long as the rows
        pairs, inv = dense_unique_inverse(edge * used + sub, m * used)
        return pairs // used, pairs % used, inv
    pairs, inv = unique_inverse(edge * slots + sub, bits_of(m * slots - 1))
    return pairs // slots, pairs % slots, inv


def _distinct_prompts(inv: torch.Tensor, prompt: torch.Tensor, m: int, n_prompts: int) -> torch.Tensor:
    """How many distinct prompts each group was seen in. A batch's prompts are a few consecutive rows:
    mark (group, prompt) in a dense [m, span] table instead of sorting the pairs."""
    if not len(prompt):
        return torch.zeros(m, dtype=torch.long, device=inv.device)
    first, last = (int(x) for x in torch.aminmax(prompt))
    span = last - first + 1
    if m * span <= 4 * len(prompt) + (1 << 20):
        seen = torch.zeros(m * span, dtype=torch.bool, device=inv.device)
        seen[inv * span + (prompt - first)] = True
        return seen.view(m, span).sum(1)
    pairs, _ = unique_inverse(inv * n_prompts + prompt, bits_of(m * n_prompts - 1))
    return segment_count(pairs // n_prompts, m)
