"""The router's pure parts: request validation (OpenAI-style errors naming the field), the choice of an
instance (least outstanding work x weight among those with room, pool first, then larger pools), and the
deadline-ordered wait queue."""

from __future__ import annotations

import json

import pytest

from controller.api.v1 import admin_pb2
from controller.router.app import _is_token
from controller.router.queue import DeadlineQueue
from controller.router.requests import RequestError, approx_tokens, parse
from controller.router.routes import ClassRoute, Endpoint, Load, Routes, choose


def _parse(body: object, *, chat: bool = False) -> object:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse(raw, chat=chat, model="m", context_tokens=100, default_max_tokens=16)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{oops", 400, "body"),
        ([1, 2], 400, "body"),
        ({"model": "other", "prompt": "x"}, 404, "model"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
        ({"model": "m", "prompt": 5}, 400, "prompt"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"model": "m", "prompt": "x", "n": 2}, 400, "n"),
        ({"model": "m", "prompt": "word " * 90, "max_tokens": 11}, 400, "prompt"),
    ],
)
def test_bad_requests_name_the_field(body: object, status: int, param: str) -> None:
    with pytest.raises(RequestError) as info:
        _parse(body)
    assert info.value.status == status and info.value.param == param
    assert info.value.body()["error"]["param"] == param


def test_the_context_limit_is_named_and_counts_prompt_and_answer() -> None:
    ok = _parse({"model": "m", "prompt": "word " * 90, "max_tokens": 10})
    assert ok.input_tokens == 90 and ok.max_tokens == 10  # type: ignore[attr-defined]
    with pytest.raises(RequestError) as info:
        _parse({"model": "m", "prompt": "word " * 90, "max_tokens": 11})
    assert "context of 100 tokens" in info.value.message


def test_chat_messages_cost_their_template() -> None:
    parsed = _parse({"model": "m", "messages": [{"role": "user", "content": "abcdefgh ab"}]}, chat=True)
    assert parsed.input_tokens == approx_tokens("abcdefgh ab") + 4 == 7  # type: ignore[attr-defined]
    with pytest.raises(RequestError) as info:
        _parse({"model": "m", "messages": [{"role": "user"}]}, chat=True)
    assert info.value.param == "messages"


def _ep(i: int, weight_s: float = 1.0) -> Endpoint:
    return Endpoint(i, "n", f"http://h:{8000 + i}", weight_s)


def test_choice_weighs_outstanding_work_by_capacity_and_falls_back_to_larger_pools() -> None:
    route = ClassRoute("p", (_ep(1, weight_s=1.0), _ep(2, weight_s=0.5)), (_ep(3),))
    load = Load()
    assert choose(route, load, 10, max_inflight=2) == _ep(2, 0.5)  # the more capable one
    load.add(2, 100)
    assert choose(route, load, 10, max_inflight=2) == _ep(1)  # 10 x 1 < 110 x 0.5
    load.add(1, 10)
    load.add(2, 1)
    assert choose(route, load, 10, max_inflight=2) == _ep(1)  # 2 has no room left (2 in flight)
    load.add(1, 1)
    assert choose(route, load, 10, max_inflight=2) == _ep(3)  # the pool is full: a larger one
    load.add(3, 1)
    load.add(3, 1)
    assert choose(route, load, 10, max_inflight=2) is None  # everything full: it waits
    load.done(2, 100)
    assert choose(route, load, 10, max_inflight=2) == _ep(2, 0.5)


def test_routes_leave_out_endpoints_without_a_port_and_keep_the_pool() -> None:
    table = admin_pb2.RoutingTable(version=7)
    route = table.classes.add(class_name="SS", pool="SL")
    route.primary.add(instance_id=1, host="10.0.0.1", http_port=8001, weight_s=0.2)
    route.primary.add(instance_id=2, host="10.0.0.1", http_port=0, weight_s=0.2)
    routes = Routes.from_pb(table)
    assert routes.version == 7
    assert routes.by_class["SS"].pool == "SL"
    assert [e.url for e in routes.by_class["SS"].primary] == ["http://10.0.0.1:8001"]


def test_the_queue_is_earliest_deadline_first_and_expires_the_late() -> None:
    q: DeadlineQueue[str] = DeadlineQueue()
    q.push(3.0, "c")
    late = q.push(1.0, "a")
    q.push(2.0, "b")
    assert q.peek() == "a" and len(q) == 3
    q.cancel(late)
    assert q.peek() == "b" and len(q) == 2
    assert q.expired(2.5) == ["b"]
    assert q.pop() == "c" and q.pop() is None and len(q) == 0


@pytest.mark.parametrize(
    ("line", "chat", "token"),
    [
        (b'data: {"id":"x","choices":[{"index":0,"text":" the","finish_reason":null}]}', False, True),
        (b'data: {"id":"x","choices":[{"index":0,"text":"","finish_reason":"length"}]}', False, False),
        (b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}', True, False),
        (b'data: {"choices":[{"index":0,"delta":{"content":"\\" hi"}}]}', True, True),
        (b'data: {"id":"x","choices":[],"usage":{"completion_tokens":3}}', False, False),
        (b'data: {"id": "x", "choices": [{"index": 0, "text": " spaced"}]}', False, True),  # parsed
        (b'data: {"id": "x", "choices": [{"index": 0, "text": ""}]}', False, False),
    ],
)
def test_token_lines_are_told_apart_with_or_without_parsing(line: bytes, chat: bool, token: bool) -> None:
    assert _is_token(line, chat) is token
