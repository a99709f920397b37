"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions and /v1/embeddings, `model` = an
adapter or the base.

Shapes follow OpenAI's API (what vLLM and LoRAX also serve), so the official clients work unchanged. A
classification adapter answers with its label as the text. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`; an invalid request is 400 as OpenAI answers it (where /predict
says 422), an unknown model is 404 with code `model_not_found`.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from .deps import Services, ServicesDep, status_of
from .engine_api import EngineAPI
from .errors import AdapterNotFound, InvalidInput, LoraswapError
from .request_context import current_request
from .schemas import MixtureFields
from .serving import (
    count_tokens, event_stream, generation_params, internal_error_message, resolve_mixture, resolve_model, sse,
    started, stream_failure, task_of,
)
from .settings import Settings
from .telemetry import RecordDep, RequestRecord
from .types import (
    MAX_TOP_LOGPROBS, ClassificationResult, GenerationParams, GenerationResult, Result, SlotKey, TokenLogprob,
)

log = logging.getLogger(__name__)
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: sampling unless asked otherwise


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(MixtureFields):
    """Parameters both endpoints take; any other field is refused (400) rather than silently ignored. With a mixture
    (`adapters`, extra_body in OpenAI's clients), `model` names the base."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=0)  # 0: only with echo (completions), to score the prompt
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, validate_default=True)  # validated into a list
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    timeout: float | None = Field(None, gt=0)  # ours (extra_body): seconds; lowers the server's request_timeout_s
    ignore_eos: bool = False  # vLLM's and llama.cpp's (extra_body): generate max_tokens whatever comes

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("n")
    @classmethod
    def _only_one(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported")
        return value


TextsOrIds = str | list[str] | list[int] | list[list[int]]  # one text, texts, one input as token ids, several


def inputs_of(value: TextsOrIds, field: str, limit: int) -> list[str | list[int]]:
    """The inputs of a request, as texts and token-id lists; none empty, at most `limit`."""
    if isinstance(value, str):
        inputs: list[str | list[int]] = [value]
    elif all(isinstance(x, int) for x in value):
        inputs = [list(value)]  # one input as token ids
    else:
        inputs = list(value)
    if len(inputs) > limit:
        raise InvalidInput(field, f"{len(inputs)} inputs, over the limit of {limit}")
    for i, x in enumerate(inputs):
        if not (x.strip() if isinstance(x, str) else x):
            raise InvalidInput(field, f"{field} is empty" if len(inputs) == 1 else f"{field} {i} is empty")
    return inputs


class CompletionRequest(Sampling):
    prompt: TextsOrIds = Field(..., min_length=1)
    echo: bool = False  # the prompt comes back before the answer (with its tokens' logprobs when logprobs is set)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # per token: its logprob and the n most likely


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: TextsOrIds = Field(..., min_length=1)
    encoding_format: Literal["float", "base64"] = "float"  # base64: the float32 values' bytes, little-endian
    dimensions: int | None = None  # refused: the vectors have the base's hidden size
    user: str | None = None
    timeout: float | None = Field(None, gt=0)  # as in completions


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


@dataclass
class Reply:
    """One answer's identity, shaped as a text completion or a chat completion (whole or as stream chunks)."""

    model: str
    chat: bool
    token_text: Callable[[int], str] | None = None  # set when the request asks for logprobs
    echoes: list[str] | None = None  # completions with echo: each prompt's text, put before its answer
    id: str = field(init=False)
    created: int = field(init=False, default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def body(self, results: list[Result], record: RequestRecord) -> dict:
        choices = []
        for index, result in enumerate(results):
            text, finish = _text_and_finish(result)
            entries = []
            if isinstance(result, GenerationResult):
                if self.echoes is not None:
                    text = self.echoes[index] + text
                    entries += result.prompt_logprobs or []
                entries += result.logprobs or []
            content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": index, **content, "logprobs": self.logprobs(entries), "finish_reason": finish})
        envelope = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        return {**envelope, "usage": usage(record)}

    def chunk(self, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        """A stream chunk; `delta` is the chat delta ({"role"}, {"content"} or {}), plain text for completions."""
        content = {"delta": delta} if self.chat else {"text": delta.get("content", "")}
        choice = {"index": 0, **content, "logprobs": logprobs, "finish_reason": finish}
        return self._envelope(self._chunk_object, [choice])

    def logprobs(self, entries: Sequence[TokenLogprob], offset: int = 0) -> dict | None:
        """Tokens' logprobs in OpenAI's shape: chat's `content` list, or the legacy completions lists, where
        `text_offset` counts the characters of the tokens before each (from `offset`) and `top_logprobs` holds the
        most likely tokens plus the chosen one (up to n + 1, as OpenAI's)."""
        if self.token_text is None:
            return None
        text_of = self.token_text
        tokens = [text_of(e.token_id) for e in entries]
        if self.chat:
            def described(token: str, logprob: float) -> dict:
                return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

            return {"content": [
                {**described(token, e.logprob), "top_logprobs": [described(text_of(t), lp) for t, lp in e.top]}
                for token, e in zip(tokens, entries)
            ], "refusal": None}
        top_logprobs: list[dict[str, float] | None] = []
        for token, e in zip(tokens, entries):
            top = None if e.logprob is None else {text_of(t): lp for t, lp in e.top}
            if top is not None:
                top.setdefault(token, e.logprob)
            top_logprobs.append(top)
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def usage_chunk(self, record: RequestRecord) -> dict:
        return {**self._envelope(self._chunk_object, []), "usage": usage(record)}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def events(
        self,
        stream: Iterator[str | TokenLogprob | Result],
        record: RequestRecord,
        include_usage: bool,
    ) -> Iterator[str]:
        """The stream as OpenAI's server-sent events, ending with `data: [DONE]`. With logprobs, each text chunk
        carries the logprobs of the tokens that arrived since the previous one (text held back waits for more)."""
        pending: list[TokenLogprob] = []
        offset = 0  # legacy text_offset: characters of the tokens sent so far

        def with_logprobs(text: str) -> str:
            nonlocal offset
            logprobs = self.logprobs(pending, offset)
            offset += sum(len(token) for token in logprobs["tokens"]) if logprobs and not self.chat else 0
            pending.clear()
            return sse(self.chunk({"content": text}, logprobs=logprobs))

        try:
            if self.chat:
                yield sse(self.chunk({"role": "assistant", "content": ""}))
            for item in stream:
                if isinstance(item, TokenLogprob):
                    pending.append(item)
                    continue
                if isinstance(item, str):
                    yield with_logprobs(item)
                    continue
                if pending:
                    yield with_logprobs("")
                count_tokens(record, [item])
                text, finish = _text_and_finish(item)
                if isinstance(item, ClassificationResult):
                    yield sse(self.chunk({"content": text}))
                yield sse(self.chunk({}, finish))
                if include_usage:
                    yield sse(self.usage_chunk(record))
        except Exception as exc:  # noqa: BLE001 - past the first byte, the error goes in the stream
            message = str(exc) if isinstance(exc, LoraswapError) else internal_error_message()
            yield sse(error_content(stream_failure(exc), message))
        yield sse("[DONE]")


def _text_and_finish(result: Result) -> tuple[str, str]:
    if isinstance(result, ClassificationResult):
        return result.label, "stop"
    return result.generated_text, result.finish_reason


def usage(record: RequestRecord) -> dict:
    return {
        "prompt_tokens": record.tokens_in,
        "completion_tokens": record.tokens_out,
        "total_tokens": record.tokens_in + record.tokens_out,
    }


# ---- errors ----------------------------------------------------------------------------------------------------

ERROR_TYPES = {401: "authentication_error", 403: "permission_error"}  # else invalid_request_error / server_error


def error_content(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_content(status, message, param, code))


def _domain_error(exc: LoraswapError, status: int) -> JSONResponse:
    if isinstance(exc, AdapterNotFound):
        message = f"The model {exc.name!r} does not exist (GET /v1/models lists the models)"
        return error_response(404, message, "model", "model_not_found")
    if isinstance(exc, InvalidInput):
        return error_response(400, str(exc), exc.field)
    response = error_response(400 if status == 422 else status, str(exc))
    response.headers.update(exc.headers or {})  # Retry-After with a 429, WWW-Authenticate with a 401
    return response


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    messages, params = [], []
    for error in exc.errors():
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"][1:]).lstrip(".")
        params.append(path or None)
        messages.append(f"{path}: {error['msg']}" if path else error["msg"])
    return error_response(400, "; ".join(messages), params[0] if params else None)


class OpenAIRoute(APIRoute):
    """Turns every error of these routes into OpenAI's error shape (the app-wide handlers say `detail`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _validation_error(exc)
            except LoraswapError as exc:
                return _domain_error(exc, status_of(exc))
            except HTTPException as exc:  # FastAPI's own, e.g. a body that is not UTF-8
                return error_response(exc.status_code, str(exc.detail))
            except Exception:
                log.exception("request failed")
                return error_response(500, internal_error_message())

        return handle


# ---- routes ----------------------------------------------------------------------------------------------------


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


def params_of(
    settings: Settings, body: Sampling, max_tokens: int | None, chat: bool,
    logprobs: int | None = None, echo: bool = False,
) -> GenerationParams:
    if max_tokens == 0 and not echo:
        raise InvalidInput("max_tokens", "0 generates nothing: it is only for scoring the prompt with echo")
    return generation_params(
        settings, max_tokens, "max_tokens",
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed, stop=body.stop, chat=chat, ignore_eos=body.ignore_eos,
        logprobs=logprobs, prompt_logprobs=echo and logprobs is not None,
    )


def stream_answer(
    reply: Reply, body: Sampling, stream: Iterator[str | Result], record: RequestRecord
) -> Response:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return event_stream(reply.events(started(stream), record, include_usage))


def refuse_for_classifier(name: str, *, logprobs: bool, echo: bool = False, token_ids: bool = False) -> None:
    """What a classification adapter cannot give: it reads text and answers a label, not tokens."""
    for param, asked in (("logprobs", logprobs), ("echo", echo)):
        if asked:
            raise InvalidInput(param, f"{name!r} is a classification adapter: it has no token logprobs")
    if token_ids:
        raise InvalidInput("prompt", f"{name!r} is a classification adapter: it takes text prompts, not token ids")


def _token_text(engine: EngineAPI, wanted: bool) -> Callable[[int], str] | None:
    return (lambda token_id: engine.decode([token_id])) if wanted else None


@router.get("/models")
def list_models(svc: ServicesDep) -> dict:
    engine = svc.ready_engine()
    base = engine.info.name

    def card(name: str, created: int, parent: str | None) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "loraswap", "root": base,
                "parent": parent}

    models = [card(base, svc.started_at, None)]
    models += [
        card(r.name, int(datetime.fromisoformat(r.created).timestamp()), base)
        for r in svc.registry.records()
    ]
    return {"object": "list", "data": models}


def resolve_target(svc: Services, engine: EngineAPI, record: RequestRecord, body: Sampling) -> SlotKey | None:
    """The mixture the body names (then `model` must name the base), else the adapter `model` names (None: the
    base)."""
    mixture = resolve_mixture(svc.registry, record, body)
    if mixture is None:
        return resolve_model(svc.registry, engine, record, body.model)
    if body.model != engine.info.name:
        raise InvalidInput("model", f"with a mixture of adapters, model names the base ({engine.info.name!r}), not "
                           f"{body.model!r}")
    return mixture


@router.post("/completions")
def completions(body: CompletionRequest, svc: ServicesDep, record: RecordDep):
    engine = svc.ready_engine()
    current_request().limit_timeout(body.timeout)
    location = resolve_target(svc, engine, record, body)
    prompts = inputs_of(body.prompt, "prompt", svc.settings.max_inputs)
    if location is not None and task_of(svc.registry, location) == "classification":
        refuse_for_classifier(location.name, logprobs=body.logprobs is not None, echo=body.echo,
                              token_ids=any(isinstance(p, list) for p in prompts))
    # a completion continues the raw prompt
    params = params_of(svc.settings, body, body.max_tokens, chat=False, logprobs=body.logprobs, echo=body.echo)
    reply = Reply(body.model, chat=False, token_text=_token_text(engine, body.logprobs is not None))
    if body.echo:
        reply.echoes = [p if isinstance(p, str) else engine.decode(p) for p in prompts]
    if body.stream:
        if len(prompts) != 1:
            raise InvalidInput("prompt", f"a streamed request takes one prompt, not {len(prompts)}")
        if body.echo:
            raise InvalidInput("echo", "echo is not supported with stream")
        stream = engine.predict_stream(location, prompts[0], params)
        return stream_answer(reply, body, stream, record)
    _, results = engine.predict(location, prompts, params)
    count_tokens(record, results)
    return reply.body(results, record)


@router.post("/chat/completions")
def chat_completions(body: ChatRequest, svc: ServicesDep, record: RecordDep):
    engine = svc.ready_engine()
    current_request().limit_timeout(body.timeout)
    location = resolve_target(svc, engine, record, body)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = params_of(svc.settings, body, body.max_completion_tokens or body.max_tokens, chat=True, logprobs=logprobs)
    reply = Reply(body.model, chat=True, token_text=_token_text(engine, logprobs is not None))
    if location is not None and task_of(svc.registry, location) == "classification":
        refuse_for_classifier(location.name, logprobs=logprobs is not None)
        # a classifier reads text as it was trained: the last user message, without the chat template
        user_texts = [m.text() for m in body.messages if m.role == "user"]
        if not user_texts or not user_texts[-1].strip():
            raise InvalidInput("messages", "a classification adapter needs a non-empty user message")
        prompt: str | list[int] = user_texts[-1]
    else:
        prompt = engine.encode_messages([{"role": m.role, "content": m.text()} for m in body.messages], params)
    if body.stream:
        return stream_answer(reply, body, engine.predict_stream(location, prompt, params), record)
    _, results = engine.predict(location, [prompt], params)  # batched with other requests
    count_tokens(record, results)
    return reply.body(results, record)


@router.post("/embeddings")
def embeddings(body: EmbeddingRequest, svc: ServicesDep, record: RecordDep):
    engine = svc.ready_engine()
    current_request().limit_timeout(body.timeout)
    location = resolve_model(svc.registry, engine, record, body.model)
    if body.dimensions is not None:
        raise InvalidInput("dimensions", f"not supported: embeddings have the base's size, {engine.info.hidden_size}")
    results = engine.embed(location, inputs_of(body.input, "input", svc.settings.max_inputs))
    record.tokens_in += sum(r.prompt_tokens for r in results)

    def encoded(vector: list[float]) -> list[float] | str:
        if body.encoding_format == "float":
            return vector
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()

    data = [{"object": "embedding", "index": i, "embedding": encoded(r.embedding)} for i, r in enumerate(results)]
    return {"object": "list", "data": data, "model": body.model,
            "usage": {"prompt_tokens": record.tokens_in, "total_tokens": record.tokens_in}}
