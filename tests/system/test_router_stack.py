"""The router in front of the controller and three simulated agents, all real processes on loopback:
requests in over the OpenAI API (streamed and not), routed by the controller's routing table to the
engines the controller started, answered; bad requests get OpenAI-style 4xx naming the field and the
router keeps serving; the controller hears the traffic (its energy ledger's traffic rows); with the
controller gone, the router keeps serving on the last table."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.system.stack import ROOT, Agent, Controller, Stack, clean_env, kill, wait_for
from tests.system.test_controller_stack import node_addresses, wait_converged

MODEL = "llama2-70b"


async def _start_router(
    tmp: Path, controller: str, *, time_scale: float = 1.0, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    """A router process in front of `controller`; `env`: what its environment adds."""
    settings = {"DYNAMOLLM_ROUTER_REPORT_INTERVAL_S": "0.2", "DYNAMOLLM_ROUTER_TIME_SCALE": str(time_scale)}
    with open(tmp / "router.log", "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller.router.app", "--listen", "127.0.0.1:0",
            "--controller", controller, env=clean_env({**settings, **(env or {})}),
            stdout=asyncio.subprocess.PIPE, stderr=err, cwd=ROOT,
        )  # fmt: skip
    assert proc.stdout is not None
    event = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
    assert event["event"] == "router_listening"
    return proc, f"http://127.0.0.1:{event['port']}"


async def _post(
    session: aiohttp.ClientSession, url: str, body: Any, path: str = "/v1/completions"
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    timeout = aiohttp.ClientTimeout(total=15)
    async with session.post(
        url + path, data=data, headers={"Content-Type": "application/json"}, timeout=timeout
    ) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text.startswith("{") else text)


async def _stream(session: aiohttp.ClientSession, url: str, max_tokens: int) -> list[str]:
    body = {"model": MODEL, "prompt": "tell me a story", "max_tokens": max_tokens, "stream": True}
    lines: list[str] = []
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            if raw.startswith(b"data: "):
                lines.append(raw.decode().strip())
    return lines


async def start_serving(
    stack: Stack, tmp: Path, agents_count: int
) -> tuple[list[Agent], Controller, asyncio.subprocess.Process, str]:
    """Agents, the controller (energy ledger every second) converged on them, and a router in front."""
    agents = await stack.start_agents(agents_count)
    ctl = await stack.start_controller(
        node_addresses(agents), env={"DYNAMOLLM_CONTROLLER_CONTROL_LEDGER_INTERVAL_S": "1"}
    )
    async with ctl.admin() as admin:
        await wait_converged(admin, agents)
    router, url = await _start_router(tmp, ctl.address)
    return agents, ctl, router, url


async def test_router_serves_through_the_controllers_routes(stack: Stack, tmp_path: Path) -> None:
    async def scenario() -> None:
        _, ctl, router, url = await start_serving(stack, tmp_path, 3)
        try:
            async with aiohttp.ClientSession() as session:

                async def routed() -> bool | None:
                    status, _ = await _post(session, url, {"model": MODEL, "prompt": "hi", "max_tokens": 3})
                    return True if status == 200 else None

                await wait_for("the router has a routing table with engine ports", routed, 20)
                chunks = await _stream(session, url, 8)
                assert chunks[-1] == "data: [DONE]" and len(chunks) == 9
                status, body = await _post(
                    session, url,
                    {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 5},
                    "/v1/chat/completions",
                )  # fmt: skip
                assert status == 200 and body["object"] == "chat.completion"
                assert len(body["choices"][0]["message"]["content"].split()) == 5
                assert body["usage"]["completion_tokens"] == 5

                bad = [
                    (b"{not json", 400, "body"),
                    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
                    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
                    ({"model": MODEL, "prompt": "word " * 5000, "max_tokens": 10}, 400, "prompt"),
                ]
                for body_in, code, param in bad:
                    status, reply = await _post(session, url, body_in)
                    assert status == code, (param, reply)
                    assert reply["error"]["param"] == param and param in reply["error"]["message"]
                status, reply = await _post(
                    session, url, {"model": MODEL, "prompt": "x" * 5, "max_tokens": 4095}
                )
                assert status == 400 and "4096" in reply["error"]["message"]
                async with aiohttp.ClientSession() as fresh:  # a 10 MB body
                    huge = b'{"model": "llama2-70b", "prompt": "' + b"a" * (10 << 20) + b'"}'
                    status, reply = await _post(fresh, url, huge)
                assert status == 413 and reply["error"]["param"] == "body"

                async def traffic_rows() -> bool | None:
                    rows = ctl.store_rows("SELECT SUM(requests_count) FROM traffic")
                    return True if rows and rows[0][0] and rows[0][0] >= 3 else None

                await wait_for("the controller's ledger counts the router's completions", traffic_rows, 15)

                await kill(ctl.proc)  # the controller goes away: the last routing table stays in force
                status, _ = await _post(
                    session, url, {"model": MODEL, "prompt": "still there?", "max_tokens": 2}
                )
                assert status == 200
        finally:
            if router.returncode is None:
                router.terminate()
                assert await asyncio.wait_for(router.wait(), 40) == 0

    await asyncio.wait_for(scenario(), 120)


async def test_router_stops_gracefully_and_a_killed_router_gives_errors_not_hangs(
    stack: Stack, tmp_path: Path
) -> None:
    async def first_chunk_then(session: aiohttp.ClientSession, url: str, act: Any) -> tuple[int, bool]:
        """Stream a 40-token answer; `act()` after the first chunk; (chunks read, whether it ended well)."""
        body = {"model": MODEL, "prompt": "a long story", "max_tokens": 40, "stream": True}
        chunks = 0
        try:
            async with session.post(url + "/v1/completions", json=body) as resp:
                async for raw in resp.content:
                    if raw.startswith(b"data: "):
                        chunks += 1
                        if chunks == 1:
                            await act()
                        if raw.startswith(b"data: [DONE]"):
                            return chunks, True
        except aiohttp.ClientError:
            return chunks, False
        return chunks, False

    async def scenario() -> None:
        agents = await stack.start_agents(3)
        ctl = await stack.start_controller(node_addresses(agents))
        async with ctl.admin() as admin:
            await wait_converged(admin, agents)
        router, url = await _start_router(tmp_path, ctl.address)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def routed() -> bool | None:
                status, _ = await _post(session, url, {"model": MODEL, "prompt": "hi", "max_tokens": 2})
                return True if status == 200 else None

            await wait_for("routes", routed, 20)

            async def terminate() -> None:
                router.terminate()

            # SIGTERM mid-stream: the request in flight is answered to its end, then the router exits 0.
            chunks, ended = await first_chunk_then(session, url, terminate)
            assert ended and chunks == 41
            assert await asyncio.wait_for(router.wait(), 40) == 0

        router, url = await _start_router(tmp_path, ctl.address)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await wait_for("routes", routed_on(session, url), 20)

            async def kill_router() -> None:
                router.kill()

            # SIGKILL mid-stream: the client gets an error at once, not a hang.
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            chunks, ended = await first_chunk_then(session, url, kill_router)
            assert not ended and loop.time() - t0 < 10
            await router.wait()

    await asyncio.wait_for(scenario(), 120)


def routed_on(session: aiohttp.ClientSession, url: str) -> Any:
    async def probe() -> bool | None:
        status, _ = await _post(session, url, {"model": MODEL, "prompt": "hi", "max_tokens": 2})
        return True if status == 200 else None

    return probe
