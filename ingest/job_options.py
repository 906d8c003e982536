"""What an ingest job is asked to do (JobOptions, RayOptions) and what it reports (JobSummary): shared by the
local job (ingest/jobs.py) and the Ray executor (ingest/ray_executor.py), which import this, not each other."""

from __future__ import annotations

from dataclasses import dataclass, field

from ingest.errors import UserFacingError
from ingest.rdfa.tensors import Pruning

DEFAULT_WINDOW_MEM = 2 << 30  # bytes of device aggregates before a window is compacted or flushed early


@dataclass
class JobOptions:
    run: str
    batch_size: int = 8
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    resume: bool = False
    max_tokens: int | None = None
    long_policy: str = "refuse"  # refuse | truncate | skip
    pruning: Pruning = field(default_factory=lambda: Pruning(top_k=5, min_abs=0.01, direct_positions=2))
    queue_size: int = 1  # windows waiting for the writer (each holds its host copy)
    progress: bool = True
    window: int | None = None  # prompts per spooled window; None: catalog.spool.DEFAULT_WINDOW
    window_mem: int = DEFAULT_WINDOW_MEM  # bytes of device aggregates a window may hold
    window_edges: int | None = None  # edges a window may hold before it is flushed early; None: no bound
    tail_window: int | None = None  # prompts below which the last windows stop halving; None: the window
    executor: str = "local"  # local | ray
    ray: RayOptions | None = None  # with executor "ray"
    mine: bool = True  # mine and store composition patterns when the run is done (catalog.mined)
    spool: str | None = None  # the folder windows are spooled to; None: catalog.spool.default_spool(store url)
    compact_mem: int = 2 << 30  # bytes a compaction may hold (catalog.compact)
    compact_workers: int = 2  # processes merging a compaction's partitions
    # publish a segment (catalog.publish_every) whenever this many prompts were spooled since the last one, or this
    # many seconds passed: queries see the run while it runs; None: the run is published when it ends
    publish_every_prompts: int | None = None
    publish_every_seconds: float | None = None


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local cluster; "auto" or HOST:PORT: join one
    workers: int = 2  # RDFA workers (actors), each with the model and SAEs loaded once
    gpus_per_worker: float = 0.0  # 0: CPU workers
    threads_per_worker: int = 1
    model: str = ""  # what each worker loads (the driver's own session only tokenizes)
    saes: list[str] = field(default_factory=list)
    transcoders: list[str] = field(default_factory=list)


@dataclass
class JobSummary:
    run: str
    prompts: int = 0
    skipped_long: int = 0
    skipped_done: int = 0
    bad_lines: int = 0
    unknown_tokens: int = 0  # words the tokenizer does not know, read as <unk> (each prompt's meta counts its own)
    prompts_with_unknown_tokens: int = 0
    observations: int = 0
    edges: int = 0  # edge rows published (each edge of the run once)
    windows: int = 0  # windows spooled
    seconds: float = 0.0  # ingest, from start to the run's finish (mining excluded)
    store_wait_seconds: float = 0.0  # the compute loop waiting on the spool, then compaction and publish
    compact_seconds: float = 0.0
    publish_seconds: float = 0.0
    mining_seconds: float = 0.0  # mining the run's composition patterns afterwards (catalog.mined)

    @property
    def store_wait_share(self) -> float:
        return self.store_wait_seconds / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "store_wait_share": round(self.store_wait_share, 4)}


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserFacingError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UserFacingError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def parse_publish_every(text: str | None) -> tuple[int | None, float | None]:
    """``--publish-every``: N prompts ("500") or M minutes ("10m") -> (prompts, seconds); (None, None) if unset."""
    if text is None:
        return None, None
    try:
        if text.endswith("m"):
            minutes = float(text[:-1])
            if minutes > 0:
                return None, minutes * 60
        elif int(text) >= 1:
            return int(text), None
    except ValueError:
        pass
    raise UserFacingError(f"--publish-every {text!r}: expected a number of prompts (500) or of minutes (10m)")
