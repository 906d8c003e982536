"""How much of a target the features explain: where a circuit is trustworthy.

A decomposed node's incoming ``attn_in``, ``resid_in`` or ``mlp_in`` edges partition its pre-activation
(RDFA), so their |attribution| can be split by what kind of node it comes from:

* ``features``: SAE and transcoder features (A, R, T): what the circuit explains in interpretable units;
* ``errors``: SAE and transcoder error nodes (A.ERR, R.ERR, T.ERR): what the dictionaries miss;
* ``other``: embeddings, decoder biases, and MLP or attention outputs left whole (MLPl, ATTNl leaves).

``feature_share`` = features / (features + errors + other) of the summed |value| of the stored observations
(``sum_abs``). It is circuit-tracer's completeness score read per node and summed per run and layer:
what a pruned graph kept (edges removed by top-k or min_abs went to REST, which is not stored) over all
prompts. A node whose inputs are mostly errors, or MLP leaves where no transcoder decomposes them, is where
a circuit stops being an explanation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from catalog.ids import FEATURE_KINDS, NodeKind, NodeRef
from catalog.schema import JSON, EdgeStats

PARTITION_KINDS = ("attn_in", "resid_in", "mlp_in")  # the edges whose values sum to their target's pre-activation
CLASSES = ("features", "errors", "other")


def source_class(ref: NodeRef) -> str:
    """features, errors or other (see the module docstring)."""
    if ref.kind in FEATURE_KINDS:
        return "features"
    return "errors" if ref.kind is NodeKind.ERROR else "other"


def shares(abs_by_class: dict[str, float]) -> JSON:
    """{features, errors, other: share of the total, total_abs}; shares are None when nothing came in."""
    total = sum(abs_by_class.get(c, 0.0) for c in CLASSES)
    out: JSON = {c: (abs_by_class.get(c, 0.0) / total if total else None) for c in CLASSES}
    out["total_abs"] = total
    return out


def input_shares(edges: Iterable[tuple[NodeRef, EdgeStats]]) -> JSON:
    """The shares of one node's incoming partition edges, given as (source ref, edge) pairs."""
    by_class: dict[str, float] = defaultdict(float)
    for src, e in edges:
        if e.kind in PARTITION_KINDS:
            by_class[source_class(src)] += e.sum_abs
    return shares(by_class)


def by_layer(edges: Iterable[EdgeStats], ref_of: Callable[[str], NodeRef]) -> list[JSON]:
    """Per (target kind, layer): the shares of every partition edge into that kind's features, and how many
    targets they reach; ``ref_of(uid)`` parses a node uid. Rows in layer order, then kind."""
    by_class: dict[tuple[str, int | None], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    targets: dict[tuple[str, int | None], set[str]] = defaultdict(set)
    for e in edges:
        if e.kind not in PARTITION_KINDS:
            continue
        dst = ref_of(e.dst)
        key = (dst.kind.value, dst.layer)
        by_class[key][source_class(ref_of(e.src))] += e.sum_abs
        targets[key].add(e.dst)
    order = {k.value: i for i, k in enumerate((NodeKind.RESID, NodeKind.ATTN, NodeKind.TRANSCODER))}
    return [{"kind": kind, "layer": layer, "targets": len(targets[(kind, layer)]), **shares(by_class[(kind, layer)])}
            for kind, layer in sorted(by_class, key=lambda k: (k[1] or 0, order.get(k[0], 9)))]
