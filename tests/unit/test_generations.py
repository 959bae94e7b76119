"""agent.api.generations: the idempotency rule of desired-state calls (NEW, REPLAY, stale, reused)."""

from __future__ import annotations

import pytest

from agent.api.errors import ConflictError, InvalidArgumentError
from agent.api.generations import Decision, Outcome, ScopeRecord, check_generation, fingerprint
from agent.api.v1 import control_pb2


def _request(engine_id: str = "e1", **options: str) -> control_pb2.ReconfigureEngineRequest:
    return control_pb2.ReconfigureEngineRequest(generation=3, engine_id=engine_id, engine_options=options)


def test_fingerprint_is_stable_and_distinguishes_requests() -> None:
    assert fingerprint(_request(a="1", b="2")) == fingerprint(_request(b="2", a="1"))  # map order
    assert fingerprint(_request()) != fingerprint(_request("e2"))


def test_new_replay_stale_and_reused_generations() -> None:
    digest = fingerprint(_request())
    assert check_generation(None, 1, digest, scope="engine e1") is Decision.NEW
    record = ScopeRecord(3, digest, Outcome(b""))
    assert check_generation(record, 4, "other", scope="engine e1") is Decision.NEW
    assert check_generation(record, 3, digest, scope="engine e1") is Decision.REPLAY
    with pytest.raises(ConflictError, match="older than the engine e1 generation in force, 3"):
        check_generation(record, 2, digest, scope="engine e1")
    with pytest.raises(InvalidArgumentError) as info:
        check_generation(record, 3, "other", scope="engine e1")
    assert info.value.field == "generation"
    with pytest.raises(InvalidArgumentError):
        check_generation(None, 0, digest, scope="GPU-scope")
