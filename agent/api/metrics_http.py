"""Serving a daemon's Prometheus metrics: `GET /metrics` over plain HTTP on its `metrics_listen` address,
shared by the agent's and the controller's entry points (the router serves its own on its API port, with
the same `CONTENT_TYPE`). The daemon hands
over how to render its exposition (the agent's reads the latest telemetry first, hence awaitable); a
bind failure is an `InvalidArgumentError` naming `metrics_listen` (the entry point prints one line and
exits 2).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from agent.api.errors import InvalidArgumentError

# The text exposition format 0.0.4, as prometheus_client's generate_latest writes it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def serve_metrics(
    listen: str, render: Callable[[], Awaitable[bytes]]
) -> tuple[web.AppRunner | None, int]:
    """Serve `/metrics` on `listen` (HOST:PORT or [IPV6]:PORT; empty: nothing is served). Returns the
    runner (`cleanup()` stops it) and the bound port, the one the kernel chose for port 0 (tests)."""
    if not listen:
        return None, 0
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgumentError("metrics_listen", listen, "HOST:PORT or [IPV6]:PORT, or empty for none")

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=await render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), int(port))
    try:
        await site.start()
    except (OSError, OverflowError) as exc:  # OverflowError: a port above 65535
        await runner.cleanup()
        raise InvalidArgumentError(
            "metrics_listen", listen, f"an address this host can bind ({exc})"
        ) from None
    addresses = runner.addresses
    return runner, int(addresses[0][1]) if addresses else int(port)
