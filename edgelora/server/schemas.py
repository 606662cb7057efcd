"""The OpenAI request bodies this server takes, checked by pydantic before anything runs, and its response bodies.

Fields the runtime cannot honour (n > 1, logprobs, penalties) are refused by name rather than
ignored, so a client never believes it got what it asked for. Unknown fields are ignored, as
OpenAI's own server does, since client libraries send extras.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .api_errors import ApiError

MAX_STOPS = 4  # as OpenAI


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=512)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class Sampling(Request):
    """What both generation endpoints share."""

    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # an extension, as vLLM's
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    ignore_eos: bool = False  # an extension, as vLLM's: runs all max_tokens steps
    truncate: bool = False  # an extension: drop the prompt's oldest tokens where it would pass the context
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    user: str | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(Sampling):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    logprobs: None = None
    echo: Literal[False] = False
    suffix: None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """Text parts joined by newlines, as vLLM hands them to templates that take plain strings."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: Literal[False] | None = None
    tools: None = None

    @model_validator(mode="after")
    def one_length_limit(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("give max_tokens or max_completion_tokens, not two different limits")
            self.max_tokens = self.max_completion_tokens
        return self


class EmbeddingRequest(Request):
    input: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                           Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


def parse(schema: type[Request], body: bytes):
    """The request, or a 400 naming the first field at fault (as OpenAI's ``param``)."""
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # of a union's members, the one that got furthest: deepest, and past the type check
        first = max(errors, key=lambda error: (len(error["loc"]), not error["type"].endswith("_type")))
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON ({first['msg'].removeprefix('Invalid JSON: ')})",
                           code="invalid_json") from None
        where = ".".join(str(part) for part in first["loc"] if not _is_type_tag(part))
        message = first["msg"]
        if first["type"] == "literal_error" and first["loc"][-1:] in (("n",), ("echo",)):
            message = "only one choice per request is supported" if where == "n" else "echo is not supported"
        raise ApiError(400, f"{where}: {message}" if where else message,
                       code="missing_field" if first["type"] == "missing" else "invalid_value",
                       param=where or None) from None


def _is_type_tag(part) -> bool:
    """pydantic names the union member it tried ('constrained-str', 'list[int]'); a client wants the field's path."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "none"} or not part.isidentifier())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(runtime_reason: str) -> str:
    """The runtime stops at EOS ("eos") or a stop string ("stop"); OpenAI calls both "stop"."""
    return "length" if runtime_reason == "length" else "stop"


def model_card(name: str, created: int, parent: str | None, owner: str) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": owner, "parent": parent, "root": parent or name}
