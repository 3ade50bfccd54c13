"""The cluster router (libllm.routing): prefix affinity under a load bound, tenants spread."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llmos.libllm.routing import Router, prefix_key

BLOCK = 16
NAMES = [f"node-{i}" for i in range(5)]


def router(n: int = 3) -> Router:
    r = Router(BLOCK)
    r.set_instances(NAMES[:n])
    return r


def prompt(prefix: int, suffix: int, blocks: int = 4) -> list[int]:
    return [prefix * 7 + i % 5 for i in range(blocks * BLOCK)] + [suffix]


def test_a_prompt_shorter_than_a_block_has_no_prefix_key() -> None:
    assert prefix_key(list(range(BLOCK - 1)), BLOCK) is None
    assert prefix_key(list(range(BLOCK)), BLOCK) is not None
    # Only the first full blocks name it: what follows them does not move it.
    assert prefix_key(prompt(1, 0, 4), BLOCK) == prefix_key(prompt(1, 99, 4), BLOCK)
    assert prefix_key(prompt(1, 0), BLOCK) != prefix_key(prompt(2, 0), BLOCK)


@given(st.lists(st.integers(0, 50), min_size=1, max_size=40))
def test_one_at_a_time_a_prefix_always_goes_to_its_preferred_instance(prefixes: list[int]) -> None:
    r = router()
    for i, p in enumerate(prefixes):
        ids = prompt(p, i)
        chosen = r.choose(ids, 100)
        key = prefix_key(ids, BLOCK)
        assert key is not None and chosen == r.preferred(key)
        r.ended(chosen, "", 100)
    assert sum(load.affine for load in r.loads.values()) == len(prefixes)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 500)), min_size=1, max_size=60))
def test_an_affine_choice_never_loads_an_instance_past_the_bound(requests: list[tuple[int, int]]) -> None:
    r = router()
    for i, (p, cost) in enumerate(requests):
        before = {n: load.tokens for n, load in r.loads.items()}
        affine_before = sum(load.affine for load in r.loads.values())
        chosen = r.choose(prompt(p, i), cost)
        if sum(load.affine for load in r.loads.values()) > affine_before:
            assert before[chosen] <= r.load_factor * sum(before.values()) / len(before)
        else:  # overflow: the least loaded for its tenant
            assert before[chosen] == min(before.values())


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=200))
def test_an_instance_leaving_moves_only_its_own_prefixes(prefixes: list[int]) -> None:
    r = router(4)
    keys = [k for p in prefixes if (k := prefix_key(prompt(p, 0), BLOCK)) is not None]
    before = {k: r.preferred(k) for k in keys}
    r.set_instances(NAMES[:3])  # node-3 leaves
    for k in keys:
        if before[k] != "node-3":
            assert r.preferred(k) == before[k]


def test_each_tenants_requests_spread_evenly_so_local_fair_share_holds_cluster_wide() -> None:
    r = router(3)
    placed: dict[str, dict[str, int]] = {"heavy": {}, "light": {}}
    for i in range(30):  # the heavy tenant floods first ...
        name = r.choose([i], 100, "heavy")
        placed["heavy"][name] = placed["heavy"].get(name, 0) + 1
    for i in range(6):  # ... then the light one comes: it is spread too, not piled on one instance
        name = r.choose([i], 100, "light")
        placed["light"][name] = placed["light"].get(name, 0) + 1
    assert sorted(placed["heavy"].values()) == [10, 10, 10]
    assert sorted(placed["light"].values()) == [2, 2, 2]


def test_loads_go_back_as_requests_progress_and_end() -> None:
    r = router(2)
    name = r.choose([1, 2, 3], 300, "t")
    r.progress(name, "t", 100)
    assert r.loads[name].tokens == 200 and r.loads[name].by_tenant["t"] == 200
    r.ended(name, "t", 200)
    assert r.loads[name].tokens == 0 and r.loads[name].requests == 0 and "t" not in r.loads[name].by_tenant


def test_no_live_instance_is_a_lookup_error() -> None:
    r = router(2)
    r.set_instances([])
    try:
        r.choose([1], 10)
    except LookupError:
        return
    raise AssertionError("choose() found an instance among none")


def test_an_idle_cluster_gives_every_instance_its_turn() -> None:
    """One request at a time (each ends before the next): no instance is left idle for ever,
    a new one included."""
    r = Router(BLOCK)
    r.set_instances(["a", "b", "c"])
    for i in range(6):
        name = r.choose([i], 10, "t")
        r.ended(name, "t", 10)
    assert {n: load.routed for n, load in r.loads.items()} == {"a": 2, "b": 2, "c": 2}
    r.set_instances(["a", "b", "c", "z"])
    name = r.choose([9], 10, "t")
    assert name == "z"
