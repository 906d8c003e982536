"""Issue 15 §3: positional roles of a real ingest (toy-ioi on IOI prompts), aggregated on the device,
against the same roles recomputed in plain Python from every stored observation."""

from __future__ import annotations

from collections import defaultdict

import pytest
from catalog_data import _roles_of

from catalog import queries
from catalog.stores import open_store
from ingest.jobs import JobOptions, run_job
from ingest.model_with_saes import ModelWithSaes


@pytest.fixture(scope="module")
def toy():
    return ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu")


def test_ingested_roles_equal_roles_recomputed_from_every_observation(toy, tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/c.db", evidence_per_edge=None)  # keep every observation
    run_job(toy, "ioi:12:4", store, JobOptions(run="r", batch_size=4, window=8, progress=False, mine=False))
    prompts = {p.uid: p for p in store.all_prompts()}
    assert all({"io_pos", "s1_pos", "s2_pos", "end_pos"} <= set(p.meta) for p in prompts.values())
    expect: dict = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    for v in store.all_evidence():
        if v.head is not None:
            for role in _roles_of(prompts[v.prompt], v.src_pos, v.dst_pos):
                expect[(v.src, v.dst, v.kind)][role][0] += 1
                expect[(v.src, v.dst, v.kind)][role][1] += abs(v.value)
    edges = list(store.all_edges())
    assert sum(bool(e.roles) for e in edges) == len(expect) > 100
    for e in edges:
        want = {name: (n, queries.rnd(a)) for name, (n, a) in expect.get((e.src, e.dst, e.kind), {}).items()}
        assert {name: (n, queries.rnd(a)) for name, (n, a) in e.roles.items()} == want, e.key
    seen = {name for e in edges for name in e.roles}
    # the IOI positions meet: S2 reads S1 (duplicate tokens), END reads the names
    assert {"duplicate", "S1->S2", "IO->END", "S1->END"} <= seen
    assert any(e.roles.get("S1->S2", (0, 0))[0] and e.roles.get("duplicate", (0, 0))[0] for e in edges)
