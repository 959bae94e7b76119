"""OpenAI request bodies as the router reads them: validation with OpenAI-style errors naming the field,
and the prompt's length in tokens. Pure.

Token counting: where the engine has no `/tokenize` (the simulated engine), the router counts as the
simulated engine does — each whitespace-separated word costs one token per 4 characters, and each chat
message 4 tokens of template — so the router's classes and context checks match the engine's own
count. Against vLLM this is an approximation of its tokenizer (English averages about 4 characters per
Llama token); a request it under-counts past the context is refused by the engine itself (400).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CHAT_TOKENS_PER_MESSAGE = 4


class RequestError(Exception):
    """An OpenAI-style error: HTTP status, message and the offending field (`param`)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
            self.status, "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


def approx_tokens(text: str) -> int:
    return sum((len(word) + 3) // 4 for word in text.split())


@dataclass(frozen=True, slots=True)
class Parsed:
    """A valid request: its body (to forward), prompt tokens, the answer's cap, whether it streams."""

    body: dict[str, Any]
    input_tokens: int
    max_tokens: int
    stream: bool
    chat: bool


def _prompt_tokens(body: dict[str, Any], chat: bool) -> int:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages: a non-empty list of {role, content} is required", "messages")
        total = 0
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                raise RequestError(400, f"messages[{i}]: an object with string role and content", "messages")
            total += approx_tokens(content) + CHAT_TOKENS_PER_MESSAGE
        return total
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return approx_tokens(prompt)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return approx_tokens(prompt[0])
    raise RequestError(400, "prompt: a string (or a list of one string) is required", "prompt")


def parse(raw: bytes, *, chat: bool, model: str, context_tokens: int, default_max_tokens: int) -> Parsed:
    """The request, or RequestError naming what is wrong (nothing is forwarded for a bad request)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body: not valid JSON ({exc})", "body") from None
    if not isinstance(body, dict):
        raise RequestError(400, "body: a JSON object is required", "body")
    if body.get("model") != model:
        raise RequestError(
            404, f"model: {str(body.get('model'))[:100]!r} does not exist; served: {model!r}", "model"
        )
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", default_max_tokens))
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(
            400, f"max_tokens: got {str(max_tokens)[:50]}; allowed: an integer >= 1", "max_tokens"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "stream: true or false", "stream")
    n = body.get("n", 1)
    if n != 1:
        raise RequestError(400, "n: only 1 is supported", "n")
    tokens = _prompt_tokens(body, chat)
    if tokens + max_tokens > context_tokens:
        field = "messages" if chat else "prompt"
        raise RequestError(
            400,
            f"{field}: {tokens} prompt tokens + max_tokens {max_tokens} exceed the model's context of "
            f"{context_tokens} tokens",
            field,
        )
    return Parsed(body, tokens, max_tokens, stream, chat)
