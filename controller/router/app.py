"""Entry point of `dynamollm-router` and the router itself: the OpenAI-compatible front door.

    dynamollm-router [--config F] [--listen HOST:PORT] [--controller HOST:PORT]

Flow of a request (`/v1/completions`, `/v1/chat/completions`, streaming or not):
1. the body is read within `max_body_bytes` and validated (`controller.router.requests`: OpenAI-style
   4xx naming the field; a prompt longer than the model's context is 400 naming the limit);
2. it is classified: input bin from its prompt tokens, output bin predicted by the simulator's online
   predictor (`controller.policy.predict`, learned from the router's own completions);
3. it is routed by the controller's routing table (`controller.router.routes`); when no instance of its
   pool or a larger one can take it, it waits in its pool's deadline-ordered queue and goes to the first
   instance that frees up; one still waiting at its TTFT deadline is refused (503, Retry-After);
4. it is forwarded to the engine, always streamed from the engine so that TTFT and TBT are measured here
   (a client that asked for no stream gets the assembled answer);
5. its arrival and its completion (true class from the real answer length, SLO met or not) are reported
   to the controller (`ReportTraffic`, batched every `report_interval_s`).

The routing table comes from the controller's `WatchEvents` stream, or with `routes_source = "mqtt"` from
the retained routes topic the controller publishes (`controller.fanout`; a malformed payload is logged
once and ignored); when the controller or the broker is down the router keeps routing on the last table
and reconnects with backoff. Traffic reports always go to the controller over gRPC. SIGTERM: stop
accepting (503), let in-flight requests finish for up to `drain_timeout_s`, exit 0. The first line on
stdout is a JSON `router_listening` event with the bound port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from agent.api.errors import DataFileError, DynamoError, InvalidArgumentError, NotFoundError
from agent.api.log import configure_logging
from agent.api.metrics_http import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agent.api.mqtt import MqttSubscriber
from agent.api.systemd import notify_ready, sd_notify
from controller.api.client import AdminClient
from controller.api.v1 import admin_pb2
from controller.fanout import routes_from_payload, routes_topic
from controller.model.classes import REQUEST_CLASSES, ClassBins, class_by_name
from controller.model.profile import Profile
from controller.policy.predict import OutputPredictor, predict_output_bin, update
from controller.profiles import default_profile, load_profile
from controller.router.metrics import RouterMetrics
from controller.router.queue import DeadlineQueue
from controller.router.requests import Parsed, RequestError, parse
from controller.router.routes import Endpoint, Load, Routes, choose
from controller.router.settings import RouterSettings, load_settings

log = structlog.get_logger("controller.router")

BINS = ClassBins()
N_OUT = 3
MAX_PENDING_REPORTS = 100_000
RETRY_AFTER_S = "1"
FINAL_REPORT_TIMEOUT_S = 2.0  # the last traffic report at stop: a controller that is down does not hold it
DISCARD_BYTES = 64 << 20  # an oversized body is read and dropped up to this, then the connection closes


@dataclass(slots=True)
class Waiter:
    cls: str
    tokens: int
    future: asyncio.Future[Endpoint]


@dataclass(slots=True)
class Measured:
    first_s: float = 0.0
    last_s: float = 0.0
    tokens: int = 0
    text: list[str] = field(default_factory=list)

    def count(self, now_s: float) -> None:
        """One more token at `now_s` (a streamed answer: its text goes straight to the client)."""
        if self.tokens == 0:
            self.first_s = now_s
        self.last_s = now_s
        self.tokens += 1

    def token(self, now_s: float, text: str) -> None:
        """One more token and its text (an answer assembled for a client that did not stream)."""
        self.count(now_s)
        self.text.append(text)


class Router:
    """The router's state and request path (module docstring)."""

    def __init__(self, settings: RouterSettings, profile: Profile) -> None:
        self.settings = settings
        self.profile = profile
        self.routes: Routes | None = None
        self.load = Load()
        self.queues: dict[str, DeadlineQueue[Waiter]] = {}
        self.predictor = OutputPredictor()
        self.arrivals: list[admin_pb2.TrafficArrival] = []
        self.completions: list[admin_pb2.TrafficCompletion] = []
        self.metrics = RouterMetrics(time.monotonic)
        self.draining = False
        self.inflight = 0
        self.session: aiohttp.ClientSession | None = None
        self._ttft_s = {c.name: profile.slo(c.name).ttft_s for c in REQUEST_CLASSES}
        self._tbt_s = {c.name: profile.slo(c.name).tbt_s for c in REQUEST_CLASSES}
        self._bad_topics: set[str] = set()  # MQTT topics whose last payload was malformed (logged once)

    # ------------------------------------------------------------------ HTTP handlers
    async def models(self, request: web.Request) -> web.Response:
        body = {
            "object": "list",
            "data": [{"id": self.settings.model, "object": "model", "owned_by": "dynamollm"}],
        }
        return web.json_response(body)

    async def health(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response(
            {"status": "ok", "routes_version": self.routes.version if self.routes else 0}
        )

    async def metrics_handler(self, request: web.Request) -> web.Response:
        body = self.metrics.exposition({pool: len(q) for pool, q in self.queues.items()})
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def completions_handler(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_handler(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        received_ns = time.time_ns()
        received_s = time.monotonic()
        try:
            if self.draining:
                raise RequestError(503, "the router is shutting down; retry on another router")
            raw = await self._read(request)
            s = self.settings
            parsed = parse(raw, chat=chat, model=s.model, context_tokens=s.context_tokens,
                           default_max_tokens=s.default_max_tokens)  # fmt: skip
        except RequestError as err:
            return _error(err)
        cls = self._classify(parsed)
        self.inflight += 1
        try:
            return await self._route_and_forward(request, parsed, cls, received_ns, received_s)
        finally:
            self.inflight -= 1

    async def _read(self, request: web.Request) -> bytes:
        limit = self.settings.max_body_bytes
        parts: list[bytes] = []
        size = 0
        while size <= limit and (chunk := await request.content.readany()):
            parts.append(chunk)
            size += len(chunk)
        if size <= limit:
            return b"".join(parts)
        # Too large: the rest is read and dropped (up to a bound), so that the client, which sends its
        # whole body before it reads the answer, gets the 413 rather than a connection reset.
        while size <= DISCARD_BYTES and (chunk := await request.content.readany()):
            size += len(chunk)
        raise RequestError(413, f"body: {size} bytes or more; allowed: at most {limit}", "body")

    def _classify(self, parsed: Parsed) -> str:
        out_bin = predict_output_bin(self.predictor, parsed.input_tokens, parsed.max_tokens)
        return REQUEST_CLASSES[BINS.input_bin(parsed.input_tokens) * N_OUT + out_bin].name

    # ------------------------------------------------------------------ routing
    async def _route_and_forward(
        self, request: web.Request, parsed: Parsed, cls: str, received_ns: int, received_s: float
    ) -> web.StreamResponse:
        deadline_s = received_s + self._ttft_s[cls] / self.settings.time_scale
        tokens = parsed.input_tokens + parsed.max_tokens
        try:
            endpoint, pool = await self._place(cls, tokens, deadline_s)  # its place is held in `load`
        except RequestError as err:
            self._report_arrival(received_ns, cls, parsed, None)
            self._report_completion(cls, parsed, "", None)
            self.metrics.requests.labels(cls, "", "rejected").inc()
            return _error(err)
        # Reported now, not at completion: the cycle's arrival history must not lag by the requests'
        # latencies (late arrivals would pile into later ticks and inflate the rates it forecasts).
        self._report_arrival(received_ns, cls, parsed, endpoint)
        measured = Measured()
        try:
            response = await self._forward(request, parsed, endpoint, measured, received_s)
        finally:
            self.load.done(endpoint.instance_id, tokens)
            self._dispatch()
        self._report_completion(cls, parsed, pool, measured, received_s)
        self.metrics.requests.labels(cls, pool, "ok" if measured.tokens else "failed").inc()
        return response

    async def _place(self, cls: str, tokens: int, deadline_s: float) -> tuple[Endpoint, str]:
        if self.routes is None:
            raise RequestError(503, "no routing table from the controller yet; retry shortly")
        route = self.routes.by_class.get(cls)
        if route is None or not (route.primary or route.fallback):
            raise RequestError(503, f"no instance serves class {cls} yet; retry shortly")
        endpoint = choose(route, self.load, tokens, self.settings.max_inflight)
        queue = self.queues.setdefault(route.pool, DeadlineQueue())
        if endpoint is not None and not len(queue):
            self.load.add(endpoint.instance_id, tokens)
            if endpoint not in route.primary:
                self.metrics.escalations.labels("fallback").inc()
            return endpoint, route.pool
        if sum(len(q) for q in self.queues.values()) >= self.settings.max_waiting:
            raise RequestError(503, "too many requests waiting; retry shortly")
        waiter = Waiter(cls, tokens, asyncio.get_running_loop().create_future())
        entry = queue.push(deadline_s, waiter)
        self.metrics.escalations.labels("queued").inc()
        self._dispatch()
        try:
            return await waiter.future, route.pool
        except asyncio.CancelledError:  # the client went away while it waited
            queue.cancel(entry)
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.load.done(future.result().instance_id, tokens)  # its place was already held
            raise

    def _dispatch(self) -> None:
        """Hand waiting requests, most urgent first, to instances that can take them."""
        if self.routes is None:
            return
        for queue in self.queues.values():
            while (head := queue.peek()) is not None:
                route = self.routes.by_class.get(head.cls)
                endpoint = (
                    choose(route, self.load, head.tokens, self.settings.max_inflight) if route else None
                )
                if endpoint is None:
                    break  # nothing can take the most urgent one now: it stays first
                queue.pop()
                if not head.future.done():
                    self.load.add(endpoint.instance_id, head.tokens)  # held from now on
                    head.future.set_result(endpoint)

    async def expire_loop(self) -> None:
        """Refuse waiting requests whose TTFT deadline has passed (they would miss anyway)."""
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            for queue in self.queues.values():
                for waiter in queue.expired(now):
                    if not waiter.future.done():
                        self.metrics.escalations.labels("expired").inc()
                        waiter.future.set_exception(
                            RequestError(503, "no instance could start the request within its TTFT target")
                        )

    # ------------------------------------------------------------------ forwarding
    async def _forward(
        self, request: web.Request, parsed: Parsed, ep: Endpoint, m: Measured, received_s: float
    ) -> web.StreamResponse:
        assert self.session is not None
        body = dict(parsed.body, model=self.settings.engine_model, stream=True, max_tokens=parsed.max_tokens)
        path = "/v1/chat/completions" if parsed.chat else "/v1/completions"
        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout_s)
        try:
            async with self.session.post(ep.url + path, json=body, timeout=timeout) as resp:
                if resp.status != 200:
                    return await _passthrough(resp)
                if parsed.stream:
                    return await self._stream(request, resp, parsed, m)
                return await self._collect(resp, parsed, m)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return _error(
                RequestError(502, f"the engine of instance {ep.instance_id} failed: {type(exc).__name__}")
            )

    async def _stream(
        self, request: web.Request, resp: aiohttp.ClientResponse, parsed: Parsed, m: Measured
    ) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        pending = b""
        # Whatever the engine sent is relayed in one write (not line by line: the per-chunk cost is what
        # limits a router); complete lines are looked at for the token times.
        async for data in resp.content.iter_any():
            now = time.monotonic()
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            for line in lines:
                if line.startswith(b"data: {") and _is_token(line, parsed.chat):
                    m.count(now)
            await out.write(data)
        await out.write_eof()
        return out

    async def _collect(self, resp: aiohttp.ClientResponse, parsed: Parsed, m: Measured) -> web.Response:
        async for line in resp.content:
            text = _chunk_text(line, parsed.chat)
            if text is not None:
                m.token(time.monotonic(), text)
        content = "".join(m.text)
        usage = {"prompt_tokens": parsed.input_tokens, "completion_tokens": m.tokens,
                 "total_tokens": parsed.input_tokens + m.tokens}  # fmt: skip
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": "length" if m.tokens >= parsed.max_tokens else "stop",
        }
        if parsed.chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        body = {
            "id": f"{'chatcmpl' if parsed.chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if parsed.chat else "text_completion",
            "created": int(time.time()),
            "model": self.settings.model,
            "choices": [choice],
            "usage": usage,
        }
        return web.json_response(body)

    # ------------------------------------------------------------------ reports
    def _report_arrival(self, received_ns: int, cls: str, parsed: Parsed, ep: Endpoint | None) -> None:
        arrival = admin_pb2.TrafficArrival(
            arrival_unix_ns=received_ns, class_name=cls, input_tokens=parsed.input_tokens
        )
        if ep is not None:
            arrival.instance_id = ep.instance_id
        self._append(self.arrivals, arrival)

    def _report_completion(
        self, cls: str, parsed: Parsed, pool: str, m: Measured | None, received_s: float = 0.0
    ) -> None:
        scale = self.settings.time_scale
        tokens = m.tokens if m is not None else 0
        true_cls = cls
        met = False
        if m is not None and tokens:
            true_cls = REQUEST_CLASSES[
                BINS.input_bin(parsed.input_tokens) * N_OUT + BINS.output_bin(tokens)
            ].name
            ttft_s = (m.first_s - received_s) * scale
            tbt_s = (m.last_s - m.first_s) / (tokens - 1) * scale if tokens > 1 else 0.0
            met = ttft_s <= self._ttft_s[true_cls] and (tokens <= 1 or tbt_s <= self._tbt_s[true_cls])
            self.metrics.ttft.labels(true_cls).observe(ttft_s)
            if tokens > 1:
                self.metrics.tbt.labels(true_cls).observe(tbt_s)
            self.predictor = update(self.predictor, parsed.input_tokens, tokens)
            self.metrics.prediction(class_by_name(cls).output_bin, BINS.output_bin(tokens))
        self.metrics.slo_outcome(true_cls, met)
        self._append(
            self.completions,
            admin_pb2.TrafficCompletion(
                finished_unix_ns=time.time_ns(), routed_class=cls, true_class=true_cls if tokens else "",
                slo_met=met, output_tokens=tokens, pool=pool,
            ),
        )  # fmt: skip

    @staticmethod
    def _append(items: list[Any], item: Any) -> None:
        items.append(item)
        if len(items) > MAX_PENDING_REPORTS:
            del items[: len(items) - MAX_PENDING_REPORTS]

    async def report_loop(self, client: AdminClient) -> None:
        warned = False
        while True:
            await asyncio.sleep(self.settings.report_interval_s)
            if not (self.arrivals or self.completions):
                continue
            arrivals, completions = self.arrivals, self.completions
            self.arrivals, self.completions = [], []
            try:
                await client.report_traffic(arrivals, completions)
                warned = False
            except InvalidArgumentError as exc:  # permanent: sending it again would fail again
                log.error("traffic_report_refused", error=str(exc), arrivals=len(arrivals))
            except DynamoError as exc:
                self.arrivals[:0], self.completions[:0] = arrivals, completions  # kept for the next try
                if not warned:
                    log.warning("traffic_report_failed", error=str(exc))
                    warned = True

    async def watch_loop(self, client: AdminClient) -> None:
        """The routing table from the controller; the last one stays in force while it is away."""
        delay_s = 0.5
        while True:
            try:
                stream = client.watch_events(kinds=("routes",))
                async with contextlib.aclosing(stream):
                    async for event in stream:
                        if event.HasField("routes"):
                            self._install(Routes.from_pb(event.routes))
                            delay_s = 0.5
            except DynamoError as exc:
                log.warning(
                    "controller_unreachable",
                    error=str(exc),
                    routes_version=self.routes.version if self.routes else 0,
                )
            await asyncio.sleep(delay_s)
            delay_s = min(10.0, delay_s * 2)

    def on_routes_message(self, topic: str, payload: bytes) -> None:
        """A routing table from the MQTT routes topic; a malformed one is logged (once until a good one
        comes) and ignored: the last good table stays in force."""
        try:
            table = routes_from_payload(payload)
        except InvalidArgumentError as exc:
            if topic not in self._bad_topics:
                self._bad_topics.add(topic)
                log.warning("mqtt_payload_invalid", topic=topic, error=str(exc))
            return
        self._bad_topics.discard(topic)
        self._install(Routes.from_pb(table))

    def _install(self, routes: Routes) -> None:
        self.routes = routes
        log.info("routes_updated", version=routes.version)
        self._dispatch()


def _is_token(line: bytes, chat: bool) -> bool:
    """Whether an SSE line carries token text: found without parsing in the compact JSON engines write
    (a relayed stream's lines are most of a router's work), else parsed."""
    key = b'"content":"' if chat else b'"text":"'
    at = line.find(key)
    if at >= 0:
        return line[at + len(key) : at + len(key) + 1] != b'"'  # an empty string is no token
    return _chunk_text(line, chat) is not None


def _chunk_text(line: bytes, chat: bool) -> str | None:
    """The token text of one SSE line (None: not a token)."""
    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
        return None
    try:
        chunk = json.loads(line[6:])
        choice = chunk["choices"][0]
        text = choice["delta"].get("content") if chat else choice.get("text")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return text if isinstance(text, str) and text else None


async def _passthrough(resp: aiohttp.ClientResponse) -> web.Response:
    headers = {"Retry-After": resp.headers["Retry-After"]} if "Retry-After" in resp.headers else None
    return web.Response(
        status=resp.status, body=await resp.read(), content_type="application/json", headers=headers
    )


def _error(err: RequestError) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER_S} if err.status == 503 else None
    response = web.json_response(err.body(), status=err.status, headers=headers)
    if err.status == 413:
        response.force_close()  # whatever is left of the body is not worth reading
    return response


# ---------------------------------------------------------------------------------------- wiring


@dataclass
class RunningRouter:
    router: Router
    runner: web.AppRunner
    port: int
    tasks: list[asyncio.Task[None]]
    client: AdminClient

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (drain_timeout_s), stop."""
        self.router.draining = True
        deadline = time.monotonic() + self.router.settings.drain_timeout_s
        while self.router.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.router.arrivals or self.router.completions:
            with contextlib.suppress(DynamoError):
                await self.client.report_traffic(
                    self.router.arrivals, self.router.completions, timeout_s=FINAL_REPORT_TIMEOUT_S
                )
        await self.runner.cleanup()
        if self.router.session is not None:
            await self.router.session.close()
        await self.client.close()


def load_router_profile(settings: RouterSettings) -> Profile:
    try:
        if settings.profile_path is not None:
            return load_profile(settings.profile_path)
        return default_profile(settings.profile_model, settings.profile_gpu)
    except NotFoundError as exc:
        raise InvalidArgumentError(
            "profile.path", str(settings.profile_path or settings.profile_model), str(exc)
        ) from None


async def start_router(settings: RouterSettings) -> RunningRouter:
    router = Router(settings, load_router_profile(settings))
    router.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    app = web.Application(client_max_size=settings.max_body_bytes)
    app.router.add_post("/v1/completions", router.completions_handler)
    app.router.add_post("/v1/chat/completions", router.chat_handler)
    app.router.add_get("/v1/models", router.models)
    app.router.add_get("/health", router.health)
    app.router.add_get("/metrics", router.metrics_handler)
    # In-flight requests get their drain time in `RunningRouter.stop`; the server's own wait for open
    # (idle keep-alive) connections at cleanup is then short.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    host, _, port = settings.listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]"), int(port))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await router.session.close()
        raise InvalidArgumentError(
            "listen", settings.listen, f"an address this host can bind ({exc})"
        ) from None
    bound = int(runner.addresses[0][1]) if runner.addresses else int(port)
    client = AdminClient(settings.controller, token=settings.controller_token, tls=settings.controller_tls)
    if settings.routes_source == "mqtt":
        topics = [routes_topic(settings.mqtt)]
        routes_task = MqttSubscriber(settings.mqtt, topics, router.on_routes_message).run()
    else:
        routes_task = router.watch_loop(client)
    tasks = [
        asyncio.create_task(routes_task, name="router-routes"),
        asyncio.create_task(router.report_loop(client), name="router-report"),
        asyncio.create_task(router.expire_loop(), name="router-expire"),
    ]
    log.info("router_started", listen=settings.listen, port=bound, controller=settings.controller)
    return RunningRouter(router, runner, bound, tasks, client)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamollm-router", description="dynamollm router: OpenAI-compatible front door."
    )
    p.add_argument("--config", default=None, help="TOML config (default /etc/dynamollm/router.toml)")
    p.add_argument("--listen", default=None, help="HTTP HOST:PORT (listen)")
    p.add_argument("--controller", default=None, help="the controller's admin address (controller)")
    p.add_argument("--time-scale", default=None, help="engines' simulated seconds per wall second")
    return p


async def _serve(settings: RouterSettings) -> int:
    running = await start_router(settings)
    print(json.dumps({"event": "router_listening", "port": running.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notify_ready(running.tasks)
    await stop.wait()
    sd_notify("STOPPING=1")
    await running.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    cli = {
        k: v
        for k, v in (("listen", ns.listen), ("controller", ns.controller), ("time_scale", ns.time_scale))
        if v is not None
    }
    try:
        settings = load_settings(Path(ns.config) if ns.config else None, cli)
    except (InvalidArgumentError, DataFileError) as exc:
        print(f"dynamollm-router: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:
        return asyncio.run(_serve(settings))
    except (InvalidArgumentError, DataFileError) as exc:
        print(f"dynamollm-router: error: {exc}", file=sys.stderr)
        return 2
    except (DynamoError, OSError) as exc:
        print(f"dynamollm-router: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
