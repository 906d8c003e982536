"""The columnar aggregate of a window of prompts: what goes from RDFA to the store in one write.

Every column is a numpy array; the only Python objects are the window's prompts and the nodes it
touches (what a person reads). Nodes and prompts are referred to by their row in ``nodes`` and
``prompts``; edges by (src, dst, kind code). The reduction that fills it runs in torch on the device
that ran RDFA (``ingest.reduce``); stores write it in bulk (one all-or-nothing write per window).
No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TypeVar

import numpy as np

from catalog.schema import EDGE_KINDS, NodeInfo, Prompt


class _Columns:
    """Parallel 1-D arrays of one length (subclasses are dataclasses)."""

    def __len__(self) -> int:
        return len(getattr(self, fields(self)[0].name))  # type: ignore[arg-type]

    def columns(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.columns().values())


@dataclass
class EdgeColumns(_Columns):
    """One row per edge: counts and moments of its observations in the window."""

    src: np.ndarray  # int64 [m] row in WindowAggregate.nodes
    dst: np.ndarray  # int64 [m]
    kind: np.ndarray  # int64 [m] index into EDGE_KINDS
    n_prompts: np.ndarray  # int64 [m] prompts the edge was observed in
    n_obs: np.ndarray  # int64 [m] observations (prompt, positions, head)
    sum: np.ndarray  # float64 [m]
    sumsq: np.ndarray  # float64 [m]
    sum_abs: np.ndarray  # float64 [m]
    min: np.ndarray  # float64 [m]
    max: np.ndarray  # float64 [m]
    n_pos: np.ndarray  # int64 [m] observations with value > 0


@dataclass
class HeadColumns(_Columns):
    """Per-head sums of attention edges: one row per (edge, head) observed."""

    src: np.ndarray  # int64 [h]
    dst: np.ndarray  # int64 [h]
    kind: np.ndarray  # int64 [h]
    head: np.ndarray  # int64 [h]
    sum: np.ndarray  # float64 [h]


@dataclass
class RoleColumns(_Columns):
    """Positional roles of attention edges' observations: one row per (edge, role) observed."""

    src: np.ndarray  # int64 [r]
    dst: np.ndarray  # int64 [r]
    kind: np.ndarray  # int64 [r]
    role: np.ndarray  # int64 [r] index into catalog.schema.ROLES
    n: np.ndarray  # int64 [r] observations of the edge with that role
    sum_abs: np.ndarray  # float64 [r] their sum of |value|


@dataclass
class EvidenceColumns(_Columns):
    """The top-N observations of each edge (N = WindowAggregate.evidence_cap)."""

    src: np.ndarray  # int64 [e]
    dst: np.ndarray  # int64 [e]
    kind: np.ndarray  # int64 [e]
    prompt: np.ndarray  # int64 [e] row in WindowAggregate.prompts
    src_pos: np.ndarray  # int64 [e]
    dst_pos: np.ndarray  # int64 [e]
    head: np.ndarray  # int64 [e], -1 where no head applies
    value: np.ndarray  # float64 [e]


@dataclass
class StatColumns(_Columns):
    """Activation statistics of the decomposed nodes (SAE features) in the window."""

    node: np.ndarray  # int64 [n] row in WindowAggregate.nodes
    n_obs: np.ndarray  # int64 [n] active positions
    n_prompts: np.ndarray  # int64 [n]
    sum_act: np.ndarray  # float64 [n]
    max_act: np.ndarray  # float64 [n]


@dataclass
class TopColumns(_Columns):
    """Each feature's strongest activations (at most catalog.schema.TOP_ACTIVATIONS per feature), grouped by
    node ascending, strongest first; with the strongest attn_in / resid_in observation into each."""

    node: np.ndarray  # int64 [t] row in WindowAggregate.nodes
    prompt: np.ndarray  # int64 [t] row in WindowAggregate.prompts
    pos: np.ndarray  # int64 [t]
    act: np.ndarray  # float64 [t]
    src: np.ndarray  # int64 [t] node row of the strongest source, -1 where none
    src_pos: np.ndarray  # int64 [t]
    head: np.ndarray  # int64 [t], -1 where no head applies
    value: np.ndarray  # float64 [t] that observation's attribution


@dataclass
class HistColumns(_Columns):
    """Activation histograms: one row per (feature, bin) with activations in it (bins: catalog.schema.HIST_SHIFT)."""

    node: np.ndarray  # int64 [g] row in WindowAggregate.nodes
    bin: np.ndarray  # int64 [g] bin code
    n: np.ndarray  # int64 [g] activations in the bin


@dataclass
class WindowAggregate:
    """Whole prompts of one run, aggregated: the unit of one store write."""

    run: str
    prompts: list[Prompt]
    nodes: list[NodeInfo]
    edges: EdgeColumns
    heads: HeadColumns
    evidence: EvidenceColumns
    stats: StatColumns
    evidence_cap: int | None  # evidence kept per edge when it was aggregated (None: all)
    observations: int = 0  # observations the window aggregates (for throughput figures)
    roles: RoleColumns = field(default_factory=lambda: empty_columns(RoleColumns))
    seq: int = -1  # the window's place in its run: the corpus position of its first prompt (-1: unknown)
    tops: TopColumns = field(default_factory=lambda: empty_columns(TopColumns))
    hists: HistColumns = field(default_factory=lambda: empty_columns(HistColumns))

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, part).nbytes for part in ("edges", "heads", "evidence", "stats", "roles", "tops",
                                                           "hists"))

    def kind_names(self, kind: np.ndarray) -> list[str]:
        names: list[str] = np.array(EDGE_KINDS, dtype=object)[kind].tolist()
        return names


C = TypeVar("C", bound=_Columns)


def empty_columns(cls: type[C]) -> C:
    """Columns of length 0 with the dtypes their docstrings give."""
    floats = {"sum", "sumsq", "sum_abs", "min", "max", "value", "sum_act", "max_act", "act"}
    return cls(**{f.name: np.zeros(0, np.float64 if f.name in floats else np.int64)
                  for f in fields(cls)})  # type: ignore[arg-type]
