"""The simulated engine program's HTTP face: vLLM's OpenAI-compatible server, health, metrics, drain.

Where it sits: `python -m agent.sim.engine` (agent.sim.engine) serves an `EngineServer` with aiohttp; each
accepted completion is submitted to the `agent.sim.realtime.RealTimeEngine` and answered from the
request's token queue, whole or streamed (one SSE chunk per token). Prompt lengths are counted with a
deterministic stand-in for a tokenizer; answers are exactly `max_tokens` long (no EOS), a fixed word
cycle, one word per token. Errors use vLLM's body (`{"object": "error", "message", "type", "param",
"code"}`): 400 naming the field, 404 for another model, 503 with Retry-After while loading or draining.

Sim-only extension: `POST /admin/drain` stops admission (new requests get 503 + Retry-After) while
accepted requests finish.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.api.errors import InvalidArgumentError, NotFoundError
from agent.sim.engine_metrics import render_metrics
from agent.sim.realtime import ABORTED, EngineRequest, RealTimeEngine

# Chat templates wrap each message in role markers; Llama's cost about this many tokens per message.
_CHAT_TOKENS_PER_MESSAGE = 4
# Generated text: a fixed word cycle, so answers are deterministic and every token is one word.
_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "away")


def approx_token_count(text: str) -> int:
    """Deterministic tokenizer stand-in: each whitespace-separated word costs one token per 4 characters
    (English averages about 4 characters per Llama token)."""
    return sum((len(word) + 3) // 4 for word in text.split())


def token_text(index: int) -> str:
    return " " + _WORDS[index % len(_WORDS)]


@functools.cache
def _choice_json(word: int, chat: bool, finish: str | None) -> bytes:
    """One streamed token's `choices[0]`, encoded (cached: the answers cycle through a few words)."""
    text = token_text(word)
    choice: dict[str, Any] = (
        {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
        if chat
        else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    )
    return json.dumps(choice, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """What the HTTP face needs of the program's options."""

    model: str
    served_model_name: str
    default_max_tokens: int
    retry_after_s: int


def _error_response(
    message: str, status: int, param: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    kind = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}.get(status, "Error")
    body = {"object": "error", "message": message, "type": kind, "param": param, "code": status}
    return web.json_response(body, status=status, headers=headers)


def _int_field(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(name, value, "an integer >= 1")
    return value


def _prompt_tokens(body: dict[str, Any]) -> int:
    ids = body.get("prompt_token_ids")
    prompt = body.get("prompt") if ids is None else ids
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return max(1, approx_token_count(prompt))
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return len(prompt)
    raise InvalidArgumentError("prompt", prompt, "a string, a list of token ids, or a batch of one of either")


def _chat_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError("messages", messages, "a non-empty list of {role, content}")
    total = 0
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            parts = [p.get("text") if isinstance(p, dict) else None for p in content]
            texts = [t for t in parts if isinstance(t, str)]
            if len(texts) != len(content):
                raise InvalidArgumentError(
                    f"messages[{i}].content", content, "a string or a list of text parts"
                )
            content = " ".join(texts)
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(content, str):
            raise InvalidArgumentError(f"messages[{i}]", msg, "{role: str, content: str}")
        total += approx_token_count(content) + _CHAT_TOKENS_PER_MESSAGE
    return total


class EngineServer:
    """The HTTP face of a `RealTimeEngine`: OpenAI-compatible endpoints, health, metrics, drain."""

    def __init__(self, opts: ServerOptions, engine: RealTimeEngine, max_model_len: int) -> None:
        self.opts = opts
        self.engine = engine
        self.max_model_len = max_model_len
        self.ready = False
        self.accepting = True
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._counter = 0
        self.created_s = int(time.time())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/admin/drain", self.drain)
        return app

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def health(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.Response(status=503, text="loading")
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        e = self.engine
        text = render_metrics(self.opts.served_model_name, e.stats, e.gauges())
        return web.Response(
            text=text,
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    async def models(self, request: web.Request) -> web.Response:
        name = self.opts.served_model_name
        card = {
            "id": name,
            "object": "model",
            "created": self.created_s,
            "owned_by": "dynamollm-sim",
            "root": self.opts.model,
            "max_model_len": self.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def drain(self, request: web.Request) -> web.Response:
        self.accepting = False
        e = self.engine
        return web.json_response({"draining": True, "running": e.num_running, "waiting": e.num_waiting})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    def _parse(self, body: Any, chat: bool) -> tuple[int, int, bool, bool]:
        """(prompt tokens, output tokens, stream, include_usage) of a request body; InvalidArgumentError
        (HTTP 400) naming the field, NotFoundError (404) for another model."""
        if not isinstance(body, dict):
            raise InvalidArgumentError("body", type(body).__name__, "a JSON object")
        model = body.get("model")
        if model is not None and model != self.opts.served_model_name:
            raise NotFoundError(f"The model `{model}` does not exist.")
        n = body.get("n", 1)
        if n != 1:
            raise InvalidArgumentError("n", n, [1])
        prompt = _chat_tokens(body) if chat else _prompt_tokens(body)
        key = (
            "max_completion_tokens"
            if chat and body.get("max_completion_tokens") is not None
            else "max_tokens"
        )
        output = _int_field(body, key, self.opts.default_max_tokens)
        assert output is not None
        if prompt + output > self.max_model_len:
            raise InvalidArgumentError(
                key,
                output,
                f"at most {self.max_model_len - prompt}: the model's maximum context length is "
                f"{self.max_model_len} tokens and the prompt has {prompt}",
            )
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidArgumentError("stream", stream, "true, false")
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage", False)) if isinstance(options, dict) else False
        return prompt, output, stream, include_usage

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if not self.ready or not self.accepting:
            why = "loading" if not self.ready else "draining"
            return _error_response(
                f"engine is {why}; retry later", 503, headers={"Retry-After": str(self.opts.retry_after_s)}
            )
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error_response("the body is not valid JSON", 400)
        try:
            prompt_tokens, output_tokens, stream, include_usage = self._parse(body, chat)
        except InvalidArgumentError as err:
            # the top-level field, as OpenAI's `param` names it
            return _error_response(str(err), 400, err.field.split("[")[0].split(".")[0])
        except NotFoundError as err:
            return _error_response(str(err), 404, "model")
        self._counter += 1
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{os.getpid()}-{self._counter}"
        self.in_flight += 1
        self._idle.clear()
        req = self.engine.submit(prompt_tokens, output_tokens)
        try:
            if stream:
                return await self._stream(request, req, rid, chat, prompt_tokens, include_usage)
            return await self._whole(request, req, rid, chat, prompt_tokens)
        except (ConnectionResetError, asyncio.CancelledError):
            self.engine.abort(req)
            raise
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def _whole(
        self, request: web.Request, req: EngineRequest, rid: str, chat: bool, prompt_tokens: int
    ) -> web.StreamResponse:
        pieces: list[str] = []
        while (index := await req.tokens.get()) is not None:
            if index == ABORTED:
                return _error_response("engine shut down before the request finished", 503)
            pieces.append(token_text(index))
        text = "".join(pieces)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.opts.served_model_name,
            "choices": [choice],
            "usage": self._usage(prompt_tokens, len(pieces)),
        }
        # written here rather than by aiohttp after return, so `in_flight` covers the delivery
        resp = web.json_response(body)
        await resp.prepare(request)
        await resp.write_eof()
        return resp

    async def _stream(
        self,
        request: web.Request,
        req: EngineRequest,
        rid: str,
        chat: bool,
        prompt_tokens: int,
        include_usage: bool,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        model = self.opts.served_model_name

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            doc: dict[str, Any] = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": choices,
            }
            if usage is not None:
                doc["usage"] = usage
            return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

        # A token's chunk is the request's fixed head, the token's choice and a fixed tail: only the
        # choice is encoded per token (streaming is most of a simulated engine's work).
        head, tail = chunk([{}]).split(b"{}", 1)

        def token_chunk(index: int, finish: str | None) -> bytes:
            return head + _choice_json(index % len(_WORDS), chat, finish) + tail

        if chat:
            await resp.write(
                chunk(
                    [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        # Every token known at a wake-up goes out in one write (the engine delivers them in bunches), the
        # first one at once: answers are exactly output_tokens long, so the last is known by its count.
        produced = 0
        finished = False
        while not finished:
            items = [await req.tokens.get()]
            while not req.tokens.empty():
                items.append(req.tokens.get_nowait())
            out: list[bytes] = []
            for index in items:
                if index is None:
                    finished = True
                    break
                if index == ABORTED:
                    await resp.write(b"".join(out))
                    await resp.write_eof()  # no [DONE]: the client sees a truncated stream
                    return resp
                produced += 1
                finish = "length" if produced == req.output_tokens else None
                out.append(token_chunk(index, finish))
            if out:
                await resp.write(b"".join(out))
        if include_usage:
            await resp.write(chunk([], self._usage(prompt_tokens, produced)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
