"""Replaying a request trace against an OpenAI-compatible server, and what its client measured.

Where it sits: `dctl load` (controller.dctl.cmd_load) turns a trace into `LoadRequest`s
(`requests_from_trace`), asks the server what it serves (`probe`: GET /v1/models), replays the requests
(`replay`) and reports (`build_report`, `format_table`). The server is the simulated engine program
(agent.sim.engine), a real vLLM, or the router in front of either: anything answering
`POST /v1/completions` with `"stream": true` in Server-Sent Events (`data: {...}` per chunk, then
`data: [DONE]`), and errors with an OpenAI error body (vLLM's `{"object": "error", "message", ...}` or
OpenAI's `{"error": {"message", ...}}`).

Replay. Request i is sent `arrival_s / speedup` wall seconds after the start, whether or not earlier ones
have finished (an open loop, as users arrive), over one aiohttp session whose connection pool holds at
most `concurrency_limit` connections (a request waiting for a connection waits on the client's clock). No
request is sent at or after `max_duration_s` wall seconds: those count as `not_sent`. Each request may
take `timeout_s` wall seconds from its send; then it is cut and fails ("timeout"), so a run lasts at most
`max_duration_s + timeout_s`. The prompt is text whose length by the simulated engine's token count
(`agent.sim.engine_http.approx_token_count`: one token per 4 characters of each word) is the trace's
input tokens (`prompt_text`); max_tokens is the trace's output tokens (at least 1).

Measured per request, on the client's clock (`clock`, injectable with `sleep` for tests), from its send
(the moment it is dispatched: waiting for a pooled connection counts): TTFT = send -> first content
chunk; TBT = mean gap between content chunks (none for a single token); e2e = send -> end of the stream;
tokens = content chunks received. Outcomes:

* ok: HTTP 200 and a well-formed stream ending in `[DONE]`;
* refused: HTTP 400 because the request is longer than the model's context (its message says "context",
  or input + output exceeds the `max_model_len` that /v1/models announced): refused at admission like the
  simulator's, and left out of SLO attainment;
* rejected: any other 4xx/5xx with an OpenAI error body (503 while draining or loading, 429, 400 for
  another field, ...), with the status and the message;
* failed: no answer in time ("timeout"), a connection error ("connection"), or an answer that is neither
  a well-formed stream nor an OpenAI error ("malformed").

Simulated seconds. The servers this replays against run the trace `speedup` times faster than real time,
so every latency measured on the wall clock is multiplied by `speedup` before it is reported or judged
against the SLOs (`controller.sim.report.within_targets`: TTFT and mean TBT within the class's targets;
single-token answers pass TBT). SLO attainment = requests meeting their SLO / (ok + rejected + failed):
every admitted request counts, as in the simulator. Classes come from the trace's token counts
(`controller.model.classes.ClassBins`).

Report (`build_report`, schema `dynamollm.loadreport/v1`): the totals and the same figures per class
(`_figures`); latency percentiles are over the ok requests, TBT weighted by each request's gap count as
the simulator's per-class TBT is.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import numpy as np

from agent.api.errors import UnavailableError
from controller.model.classes import REQUEST_CLASSES, ClassBins, ClassSlo

if TYPE_CHECKING:
    from controller.sim.traces import Trace

SCHEMA = "dynamollm.loadreport/v1"
Outcome = Literal["ok", "rejected", "refused", "failed"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "rejected", "refused", "failed")
FAILURE_KINDS = ("timeout", "connection", "malformed")

# One word of 4 characters costs exactly one token in the simulated engine's count; a real (Llama,
# GPT) tokenizer also reads " word" as one token, so the prompt is about as long there.
PROMPT_WORD = "word"
# Longest prompt sent when the server did not say its context length: ~750 kB of text, below aiohttp's
# default 1 MiB request limit (the simulated engine's), and far beyond any model's context.
MAX_PROMPT_TOKENS = 150_000
_ERROR_BODY_BYTES = 1 << 16  # read at most this much of an error answer
# A stream line longer than this is malformed (aiohttp's own readline limit was lower still).
_MAX_LINE_BYTES = 1 << 20
_REASON_CHARS = 200  # longest error message kept
_PROBE_TIMEOUT_S = 10.0


def prompt_text(tokens: int) -> str:
    """A prompt of `tokens` tokens by the simulated engine's count ("word word ..."); "" for 0 (which the
    engine counts as one token)."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return " ".join([PROMPT_WORD] * tokens)


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """One request of the replay: when to send it (wall seconds after the start) and its lengths."""

    index: int
    send_s: float
    input_tokens: int
    output_tokens: int
    class_name: str


def requests_from_trace(
    trace: Trace, speedup: float, bins: ClassBins | None = None
) -> tuple[LoadRequest, ...]:
    """The trace's requests in arrival order, sent at `arrival_s / speedup`, classed by their lengths."""
    if not (math.isfinite(speedup) and speedup > 0):
        raise ValueError(f"speedup must be positive, got {speedup}")
    classes = (bins or ClassBins()).class_indices(trace.input_tokens, trace.output_tokens)
    return tuple(
        LoadRequest(
            index=i,
            send_s=float(trace.arrival_s[i]) / speedup,
            input_tokens=int(trace.input_tokens[i]),
            output_tokens=int(trace.output_tokens[i]),
            class_name=REQUEST_CLASSES[int(classes[i])].name,
        )
        for i in range(len(trace))
    )


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What GET /v1/models said: the model to ask for and its context length (None when not said)."""

    model: str
    max_model_len: int | None


def base_url(url: str) -> str:
    return url.rstrip("/")


async def probe(session: aiohttp.ClientSession, url: str, model: str | None) -> ServerInfo:
    """Ask GET /v1/models once: the first model's id when `model` is None, and the context length of the
    model used when the server announces one (vLLM: `max_model_len`). UnavailableError naming --url when
    the server cannot be reached, or when no model is given and it names none."""
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT_S):
            async with session.get(base_url(url) + "/v1/models") as resp:
                status = resp.status
                raw = await resp.content.read(_ERROR_BODY_BYTES * 16)
    except TimeoutError:
        raise UnavailableError(
            f"--url {url}: no answer to GET /v1/models within {_PROBE_TIMEOUT_S:g} s"
        ) from None
    except (aiohttp.ClientError, OSError) as err:
        raise UnavailableError(
            f"--url {url}: unreachable ({_one_line(str(err)) or type(err).__name__})"
        ) from None
    cards: list[dict[str, Any]] = []
    if status == 200:
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        data = doc.get("data") if isinstance(doc, dict) else None
        if isinstance(data, list):
            cards = [c for c in data if isinstance(c, dict) and isinstance(c.get("id"), str)]
    if model is None:
        if not cards:
            why = f"HTTP {status}" if status != 200 else "no model listed"
            raise UnavailableError(
                f"--url {url}: GET /v1/models named no model ({why}); give the model with --model"
            )
        model = str(cards[0]["id"])
    card = next((c for c in cards if c["id"] == model), None)
    length = card.get("max_model_len") if card is not None else None
    max_model_len = (
        length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None
    )
    return ServerInfo(model=model, max_model_len=max_model_len)


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """How to replay: where, which model, the time compression, the bounds and the SLOs of the classes."""

    url: str
    model: str
    speedup: float = 1.0
    timeout_s: float = 300.0
    max_duration_s: float | None = None
    concurrency_limit: int = 512
    max_model_len: int | None = None
    slos: Mapping[str, ClassSlo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.speedup) and self.speedup > 0):
            raise ValueError(f"speedup must be positive, got {self.speedup}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.concurrency_limit < 1:
            raise ValueError(f"concurrency_limit must be >= 1, got {self.concurrency_limit}")

    @property
    def prompt_cap_tokens(self) -> int:
        """Longest prompt sent: one token past the context when it is known (the server refuses it for
        the same reason as the full one), else MAX_PROMPT_TOKENS."""
        return (
            MAX_PROMPT_TOKENS
            if self.max_model_len is None
            else min(MAX_PROMPT_TOKENS, self.max_model_len + 1)
        )


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What the client saw of one request. Latencies in simulated seconds (wall x speedup); None when
    there is none (no content chunk, fewer than two, or no end)."""

    index: int
    class_name: str
    input_tokens: int
    output_tokens: int
    prompt_tokens_sent: int
    sent_s: float  # wall seconds after the start
    outcome: Outcome
    status: int | None
    kind: str | None  # failed: timeout | connection | malformed; rejected: the HTTP status
    reason: str | None
    ttft_s: float | None
    tbt_mean_s: float | None
    e2e_s: float | None
    tokens: int
    slo_met: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "class": self.class_name,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "prompt_tokens_sent": self.prompt_tokens_sent,
            "sent_s": self.sent_s,
            "outcome": self.outcome,
            "status": self.status,
            "kind": self.kind,
            "reason": self.reason,
            "ttft_s": self.ttft_s,
            "tbt_mean_s": self.tbt_mean_s,
            "e2e_s": self.e2e_s,
            "tokens": self.tokens,
            "slo_met": self.slo_met,
        }


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """The records of the requests sent (in send order), how many were not sent, and the run's wall time."""

    records: tuple[RequestRecord, ...]
    not_sent: int
    wall_s: float


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a replay stands: sent, finished (any outcome), meeting the SLO, judged (finished and not
    refused), wall seconds since the start."""

    sent: int
    done: int
    slo_met: int
    judged: int
    elapsed_s: float


Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class _Measure:
    """Client-side observations of one request, in wall seconds on the injected clock."""

    t_send: float
    status: int | None = None
    first: float | None = None
    last: float | None = None
    end: float | None = None
    tokens: int = 0


class _Outcome(Exception):
    """Ends a request early with this outcome."""

    def __init__(self, outcome: Outcome, kind: str | None, reason: str) -> None:
        super().__init__(reason)
        self.outcome: Outcome = outcome
        self.kind = kind
        self.reason = reason


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _REASON_CHARS else line[: _REASON_CHARS - 3] + "..."


def error_message(raw: bytes) -> str | None:
    """The message of an OpenAI error body (vLLM's `{"object": "error", "message"}` or OpenAI's
    `{"error": {"message"}}`), None when `raw` is not one."""
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return _message_of(doc)


def _message_of(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return None
    if doc.get("object") == "error" and isinstance(doc.get("message"), str):
        return str(doc["message"])
    err = doc.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err["message"])
    if isinstance(err, str):
        return err
    return None


def _content(doc: Any) -> str | None:
    """The text of a completion (or chat) chunk; None when the chunk is not one."""
    if not isinstance(doc, dict) or not isinstance(doc.get("choices"), list):
        return None
    choices = doc["choices"]
    if not choices:
        return ""  # a usage chunk
    choice = choices[0]
    if not isinstance(choice, dict):
        return None
    text = choice.get("text")
    if isinstance(text, str):
        return text
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return content if isinstance(content, str) else ""
    return None


class _Replay:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: ReplayConfig,
        clock: Clock,
        on_progress: Callable[[Progress], None] | None,
    ) -> None:
        self.session = session
        self.config = config
        self.clock = clock
        self.on_progress = on_progress
        self.url = base_url(config.url) + "/v1/completions"
        self.start = clock()
        self.sent = 0
        self.done = 0
        self.met = 0
        self.judged = 0

    def notify(self) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(self.sent, self.done, self.met, self.judged, self.clock() - self.start))

    async def one(self, req: LoadRequest, t_send: float) -> RequestRecord:
        """Send `req` (dispatched at `t_send` on the clock, from which its latencies count) and record it."""
        cfg = self.config
        prompt_tokens = min(req.input_tokens, cfg.prompt_cap_tokens)
        body = {
            "model": cfg.model,
            "prompt": prompt_text(prompt_tokens),
            "max_tokens": max(1, req.output_tokens),
            "stream": True,
        }
        m = _Measure(t_send=t_send)
        try:
            async with asyncio.timeout(cfg.timeout_s):
                await self._exchange(body, req, m)
            outcome: Outcome = "ok"
            kind: str | None = None
            reason: str | None = None
        except _Outcome as o:
            outcome, kind, reason = o.outcome, o.kind, o.reason
        except TimeoutError:
            outcome, kind = "failed", "timeout"
            reason = f"no complete answer within --timeout-s {cfg.timeout_s:g} (wall)"
        except (aiohttp.ClientPayloadError, ValueError) as err:  # ValueError: a line past the reader's limit
            outcome, kind, reason = "failed", "malformed", _one_line(f"broken stream: {err}")
        except (aiohttp.ClientError, OSError) as err:
            outcome, kind = "failed", "connection"
            reason = _one_line(f"{type(err).__name__}: {err}")
        record = self._record(req, prompt_tokens, m, outcome, kind, reason)
        self.done += 1
        if outcome != "refused":
            self.judged += 1
            self.met += int(record.slo_met)
        self.notify()
        return record

    async def _exchange(self, body: dict[str, Any], req: LoadRequest, m: _Measure) -> None:
        async with self.session.post(self.url, json=body) as resp:
            m.status = resp.status
            if resp.status != 200:
                raw = await resp.content.read(_ERROR_BODY_BYTES)
                m.end = self.clock()
                raise self._refusal(resp.status, raw, req)
            # Read as it comes (one await per read, not per line: at a compressed replay's token rates the
            # per-line cost is what limits the load generator); every token of a read has its time.
            saw_done = False
            pending = b""
            async for data in resp.content.iter_any():
                now = self.clock()
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                if len(pending) > _MAX_LINE_BYTES:
                    raise ValueError(f"a line longer than {_MAX_LINE_BYTES} bytes")
                for raw_line in lines:
                    if self._line(raw_line, m, now):
                        saw_done = True
                        break
                if saw_done:
                    break
            else:
                saw_done = bool(pending) and self._line(pending, m, self.clock())
            m.end = self.clock()
            if not saw_done:
                raise _Outcome("failed", "malformed", f"stream ended without [DONE] after {m.tokens} tokens")

    @staticmethod
    def _line(raw_line: bytes, m: _Measure, now: float) -> bool:
        """Take one line of the event stream into `m`; True at `data: [DONE]`."""
        line = raw_line.strip()
        if not line or line.startswith(b":") or not line.startswith(b"data:"):
            return False  # blank separators, comments, event:/id:/retry: fields
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Outcome(
                "failed", "malformed", _one_line(f"not JSON in the stream: {data[:80]!r}")
            ) from None
        message = _message_of(doc)
        if message is not None:
            raise _Outcome("failed", "malformed", _one_line(f"error in the stream: {message}"))
        text = _content(doc)
        if text is None:
            raise _Outcome("failed", "malformed", _one_line(f"not a completion chunk: {data[:80]!r}"))
        if text:
            if m.first is None:
                m.first = now
            m.last = now
            m.tokens += 1
        return False

    def _refusal(self, status: int, raw: bytes, req: LoadRequest) -> _Outcome:
        message = error_message(raw)
        if message is None:
            text = raw.decode("utf-8", errors="replace")
            return _Outcome(
                "failed", "malformed", _one_line(f"HTTP {status} without an OpenAI error body: {text}")
            )
        limit = self.config.max_model_len
        too_long = "context" in message.lower() or (
            limit is not None and req.input_tokens + max(1, req.output_tokens) > limit
        )
        if status == 400 and too_long:
            return _Outcome("refused", "context", _one_line(message))
        return _Outcome("rejected", str(status), _one_line(message))

    def _record(
        self,
        req: LoadRequest,
        prompt_tokens: int,
        m: _Measure,
        outcome: Outcome,
        kind: str | None,
        reason: str | None,
    ) -> RequestRecord:
        x = self.config.speedup
        ttft = None if m.first is None else (m.first - m.t_send) * x
        tbt = None
        if m.first is not None and m.last is not None and m.tokens >= 2:
            tbt = (m.last - m.first) / (m.tokens - 1) * x
        e2e = None if m.end is None else (m.end - m.t_send) * x
        met = outcome == "ok" and _meets(ttft, tbt, m.tokens, self.config.slos.get(req.class_name))
        return RequestRecord(
            index=req.index,
            class_name=req.class_name,
            input_tokens=req.input_tokens,
            output_tokens=req.output_tokens,
            prompt_tokens_sent=prompt_tokens,
            sent_s=m.t_send - self.start,
            outcome=outcome,
            status=m.status,
            kind=kind,
            reason=reason,
            ttft_s=ttft,
            tbt_mean_s=tbt,
            e2e_s=e2e,
            tokens=m.tokens,
            slo_met=met,
        )


def _meets(ttft_s: float | None, tbt_s: float | None, tokens: int, slo: ClassSlo | None) -> bool:
    """The simulator's SLO rule (controller.sim.report.within_targets) for one request."""
    from controller.sim.report import within_targets

    if slo is None or ttft_s is None:
        return False
    ok = within_targets(
        np.array([ttft_s]),
        np.array([math.nan if tbt_s is None else tbt_s]),
        np.array([tokens]),
        np.array([slo.ttft_s]),
        np.array([slo.tbt_s]),
    )
    return bool(ok[0])


async def replay(
    requests: Sequence[LoadRequest],
    config: ReplayConfig,
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    on_progress: Callable[[Progress], None] | None = None,
    session: aiohttp.ClientSession | None = None,
) -> ReplayResult:
    """Send `requests` (sorted by send_s) at their times and wait for every one to end; see the module
    docstring for the rules. `session`: an open session to use (default: one of its own, with a
    connection pool of `config.concurrency_limit`)."""
    if session is None:
        connector = aiohttp.TCPConnector(limit=config.concurrency_limit)
        timeout = aiohttp.ClientTimeout(total=None)  # each request is bounded by timeout_s instead
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as own:
            return await _replay(requests, config, clock, sleep, on_progress, own)
    return await _replay(requests, config, clock, sleep, on_progress, session)


async def _replay(
    requests: Sequence[LoadRequest],
    config: ReplayConfig,
    clock: Clock,
    sleep: Sleep,
    on_progress: Callable[[Progress], None] | None,
    session: aiohttp.ClientSession,
) -> ReplayResult:
    run = _Replay(session, config, clock, on_progress)
    tasks: list[asyncio.Task[RequestRecord]] = []
    not_sent = 0
    limit = config.max_duration_s
    try:
        for i, req in enumerate(requests):
            if limit is not None and req.send_s >= limit:
                not_sent = len(requests) - i
                break
            delay = run.start + req.send_s - clock()
            if delay > 0:
                await sleep(delay)
            if limit is not None and clock() - run.start >= limit:
                not_sent = len(requests) - i
                break
            tasks.append(asyncio.create_task(run.one(req, clock())))
            run.sent += 1
            run.notify()
        records = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return ReplayResult(records=tuple(records), not_sent=not_sent, wall_s=clock() - run.start)


# ------------------------------------------------------------------------------------------ report
def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def _figures(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Counts, SLO attainment and latency percentiles (simulated seconds) of some records."""
    from controller.sim.report import weighted_percentile

    counts: dict[str, int] = {o: sum(1 for r in records if r.outcome == o) for o in OUTCOMES}
    admitted = len(records) - counts["refused"]
    met = sum(1 for r in records if r.slo_met)
    ok = [r for r in records if r.outcome == "ok"]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    with_gaps = [r for r in ok if r.tbt_mean_s is not None]
    tbt = np.array([r.tbt_mean_s for r in with_gaps], dtype=np.float64)
    gaps = np.array([r.tokens - 1 for r in with_gaps], dtype=np.int64)
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    return {
        "requests": len(records),
        **counts,
        "admitted": admitted,
        "slo_met": met,
        "slo_attainment": met / admitted if admitted else None,
        "ttft_s_p50": _percentile(ttft, 50),
        "ttft_s_p99": _percentile(ttft, 99),
        "tbt_s_p50": weighted_percentile(tbt, gaps, 50),
        "tbt_s_p99": weighted_percentile(tbt, gaps, 99),
        "e2e_s_p99": _percentile(e2e, 99),
        "tokens_received": sum(r.tokens for r in records),
    }


def _by_kind(records: Sequence[RequestRecord], outcome: Outcome) -> dict[str, dict[str, Any]]:
    """{kind: {count, example}} of the records with this outcome (kind: HTTP status or failure kind)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.outcome != outcome:
            continue
        entry = out.setdefault(str(r.kind), {"count": 0, "example": r.reason})
        entry["count"] += 1
    return dict(sorted(out.items()))


def build_report(
    result: ReplayResult,
    config: ReplayConfig,
    *,
    meta: Mapping[str, Any],
    include_requests: bool = False,
) -> dict[str, Any]:
    """The `dynamollm.loadreport/v1` document of a replay: `meta` (trace, window, ...) then the settings,
    totals, why requests were rejected or failed, and the figures per class (SS..LL, each with its SLO)."""
    records = result.records
    report: dict[str, Any] = {
        "schema": SCHEMA,
        **meta,
        "url": config.url,
        "model": config.model,
        "max_model_len": config.max_model_len,
        "speedup": config.speedup,
        "time_basis": (
            f"simulated seconds: wall-clock seconds measured at the client x speedup {config.speedup:g}"
            if config.speedup != 1.0
            else "wall-clock seconds measured at the client (speedup 1)"
        ),
        "timeout_s": config.timeout_s,
        "max_duration_s": config.max_duration_s,
        "concurrency_limit": config.concurrency_limit,
        "wall_s": result.wall_s,
        "trace_requests": len(records) + result.not_sent,
        "not_sent": result.not_sent,
        **_figures(records),
        "rejected_by_status": _by_kind(records, "rejected"),
        "failed_by_kind": _by_kind(records, "failed"),
        "refused_examples": [r.reason for r in records if r.outcome == "refused"][:1],
        "per_class": {},
    }
    for c in REQUEST_CLASSES:
        mine = [r for r in records if r.class_name == c.name]
        slo = config.slos.get(c.name)
        report["per_class"][c.name] = {
            **_figures(mine),
            "slo": None if slo is None else {"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s},
        }
    if include_requests:
        report["request_records"] = [r.to_json() for r in records]
    return report


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100.0 * share:.1f}%"


def format_table(report: Mapping[str, Any]) -> str:
    """The report for a terminal: summary lines, the per-class table and the key of the class names."""
    from controller.sim.plots import class_key

    r = report
    unit = " (simulated s)" if r["speedup"] != 1.0 else " (s)"
    window = r.get("window") or {}
    lines = [
        f"load {r['url']}  model {r['model']}  trace {r.get('trace', '-')}"
        + (
            f" (start {_fmt(window.get('start_s'))} s, duration {_fmt(window.get('duration_s'))} s,"
            f" rate x{window.get('rate_scale', 1.0):g})"
            if window
            else ""
        ),
        f"times: {r['time_basis']}",
        f"sent {r['requests']} of {r['trace_requests']}"
        + (f" ({r['not_sent']} not sent: past --max-duration-s)" if r["not_sent"] else "")
        + f"  ok {r['ok']}  rejected {r['rejected']}  failed {r['failed']}"
        f"  refused at admission {r['refused']}  wall {r['wall_s']:.1f} s",
        f"SLO attainment {_pct(r['slo_attainment'])} ({r['slo_met']} of {r['admitted']} admitted)"
        f"  TTFT p50 {_fmt(r['ttft_s_p50'])} p99 {_fmt(r['ttft_s_p99'])}"
        f"  TBT p50 {_fmt(r['tbt_s_p50'])} p99 {_fmt(r['tbt_s_p99'])}  e2e p99 {_fmt(r['e2e_s_p99'])}{unit}",
    ]
    for title, key in (("rejected", "rejected_by_status"), ("failed", "failed_by_kind")):
        for kind, entry in r[key].items():
            label = f"HTTP {kind}" if key == "rejected_by_status" else kind
            lines.append(f"{title}: {label} x{entry['count']}, e.g. {entry['example']}")
    if r["refused_examples"]:
        lines.append(f"refused at admission (longer than the context), e.g. {r['refused_examples'][0]}")
    lines += [
        "",
        f"{'class':<6}{'sent':>6}{'ok':>6}{'rej':>5}{'fail':>5}{'refus':>6}{'SLO met':>9}"
        f"{'TTFT p50':>10}{'TTFT p99':>10}{'SLO TTFT':>10}{'TBT p50':>9}{'TBT p99':>9}{'SLO TBT':>9}"
        f"{'e2e p99':>9}",
    ]
    rows = [*r["per_class"].items(), ("total", {**r, "slo": None})]
    for name, c in rows:
        slo = c["slo"] or {}
        lines.append(
            f"{name:<6}{c['requests']:>6}{c['ok']:>6}{c['rejected']:>5}{c['failed']:>5}{c['refused']:>6}"
            f"{_pct(c['slo_attainment']):>9}{_fmt(c['ttft_s_p50']):>10}{_fmt(c['ttft_s_p99']):>10}"
            f"{_fmt(slo.get('ttft_s')):>10}{_fmt(c['tbt_s_p50']):>9}{_fmt(c['tbt_s_p99']):>9}"
            f"{_fmt(slo.get('tbt_s')):>9}{_fmt(c['e2e_s_p99']):>9}"
        )
    lines += [
        "",
        f"latencies{unit}; SLO met = TTFT and mean TBT within the class's targets, over ok + rejected + "
        "failed (refused at admission left out)",
        class_key(),
    ]
    return "\n".join(lines)
