"""agent.api.generations: the idempotency rule of desired-state calls (NEW, REPLAY, stale, reused) and the
bounded generation space (at most 2^63-1, and at most max(c + 2^32, clock_ns + 2^40) for a new one)."""

from __future__ import annotations

import pytest

from agent.api.errors import ConflictError, InvalidArgumentError
from agent.api.generations import (
    MAX_GENERATION,
    Decision,
    Outcome,
    ScopeRecord,
    check_generation,
    check_generation_value,
    fingerprint,
    generation_limit,
)
from agent.api.v1 import control_pb2

NOW_NS = 1_800_000_000_000_000_000  # the wall clock, as dctl draws generations from it


def _request(engine_id: str = "e1", **options: str) -> control_pb2.ReconfigureEngineRequest:
    return control_pb2.ReconfigureEngineRequest(generation=3, engine_id=engine_id, engine_options=options)


def _check(record: ScopeRecord | None, generation: int, digest: str, now_unix_ns: int = NOW_NS) -> Decision:
    return check_generation(record, generation, digest, scope="engine e1", now_unix_ns=now_unix_ns)


def test_fingerprint_is_stable_and_distinguishes_requests() -> None:
    assert fingerprint(_request(a="1", b="2")) == fingerprint(_request(b="2", a="1"))  # map order
    assert fingerprint(_request()) != fingerprint(_request("e2"))


def test_new_replay_stale_and_reused_generations() -> None:
    digest = fingerprint(_request())
    assert _check(None, 1, digest) is Decision.NEW
    record = ScopeRecord(3, digest, Outcome(b""))
    assert _check(record, 4, "other") is Decision.NEW
    assert _check(record, 3, digest) is Decision.REPLAY
    with pytest.raises(ConflictError, match="older than the engine e1 generation in force, 3"):
        _check(record, 2, digest)
    with pytest.raises(InvalidArgumentError) as info:
        _check(record, 3, "other")
    assert info.value.field == "generation"
    with pytest.raises(InvalidArgumentError):
        _check(None, 0, digest)


def test_the_generation_space_cannot_be_used_up() -> None:
    digest = fingerprint(_request())
    # counters and wall-clock generations are both new generations, from any current value
    assert _check(None, NOW_NS, digest) is Decision.NEW
    assert _check(ScopeRecord(7, digest, Outcome(b"")), 8, "x") is Decision.NEW
    assert _check(None, NOW_NS + 2**40, digest) is Decision.NEW  # a client clock up to ~18 min ahead
    for too_far in (2**64 - 1, MAX_GENERATION + 1, MAX_GENERATION, NOW_NS + 2**40 + 1):
        with pytest.raises(InvalidArgumentError) as info:
            _check(None, too_far, digest)
        assert info.value.field == "generation"
        assert info.value.allowed.startswith(f"1..{NOW_NS + 2**40} for a new engine e1 generation")
    # above the clock, a scope climbs at most 2^32 per accepted call
    ahead = ScopeRecord(NOW_NS + 2**40, digest, Outcome(b""))
    assert _check(ahead, NOW_NS + 2**40 + 2**32, "x") is Decision.NEW
    with pytest.raises(InvalidArgumentError):
        _check(ahead, NOW_NS + 2**40 + 2**32 + 1, "x")
    # never above 2^63-1, yet a scope recorded there (by an older agent) still answers its replay
    assert generation_limit(MAX_GENERATION - 5, NOW_NS) == MAX_GENERATION
    top = ScopeRecord(2**64 - 1, digest, Outcome(b""))
    assert _check(top, 2**64 - 1, digest) is Decision.REPLAY


def test_static_range_for_calls_that_open_no_generation() -> None:
    assert check_generation_value(MAX_GENERATION) == MAX_GENERATION
    for bad in (0, MAX_GENERATION + 1, 2**64 - 1):
        with pytest.raises(InvalidArgumentError, match=r"allowed: 1\.\.9223372036854775807"):
            check_generation_value(bad)
