"""What /predict and the OpenAI-compatible routes share: naming the model, bounding parameters, counting tokens,
and server-sent events."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict
from typing import TypeVar

from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from .deps import status_of
from .engine_api import EngineAPI
from .errors import InvalidInput, LoraswapError
from .metrics import BASE_LABEL, MIXTURE_LABEL
from .registry import Registry
from .request_context import current_request
from .schemas import MixtureFields
from .settings import Settings
from .telemetry import RequestRecord
from .types import (
    PRUNING, AdapterLocation, GenerationParams, GenerationResult, MixtureKey, MixturePart, Result, SlotKey, Task,
    TokenLogprob,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def resolve_model(
    registry: Registry, engine: EngineAPI, record: RequestRecord, name: str | None
) -> AdapterLocation | None:
    """The adapter version to serve, or None for the base (no name, or the base's own name, which wins over an
    adapter of the same name); labels the request's metrics with it. Raises AdapterNotFound."""
    if name is None or name == engine.info.name:
        record.adapter = BASE_LABEL
        return None
    location = registry.locate(name)
    record.adapter = location.name
    return location


def resolve_mixture(registry: Registry, record: RequestRecord, body: MixtureFields) -> MixtureKey | None:
    """The mixture a request's body names (`adapters`, `combination`, `density`, `mixture_seed`), or None if it
    names none; labels the request's metrics as a mixture. Raises AdapterNotFound for an unknown adapter and
    InvalidInput naming the field for the rest; whether the adapters can be mixed is the engine's to say."""
    if body.adapters is None:
        for field in ("combination", "density", "mixture_seed"):
            if getattr(body, field) is not None:
                raise InvalidInput(field, "applies to a mixture only: name its adapters in `adapters`")
        return None
    names = [entry.name for entry in body.adapters]
    if twice := next((name for name in names if names.count(name) > 1), None):
        raise InvalidInput("adapters", f"{twice!r} is named twice: give each adapter once, with its weight")
    combination = body.combination or "linear"
    if len(names) == 1 and combination != "linear":
        raise InvalidInput("combination", f"one adapter combines as 'linear' only (as in PEFT), not {combination!r}")
    if combination in PRUNING and body.density is None:
        raise InvalidInput("density", f"{combination} needs a density (the share of each tensor kept, 0 < d <= 1)")
    if combination not in PRUNING and body.density is not None:
        raise InvalidInput("density", f"applies to {', '.join(PRUNING)}, not to {combination}")
    if not combination.startswith("dare") and body.mixture_seed is not None:
        raise InvalidInput("mixture_seed", f"only dare_linear and dare_ties prune at random, not {combination}")
    parts = tuple(MixturePart(registry.locate(entry.name), entry.weight) for entry in body.adapters)
    seed = (body.mixture_seed or 0) if combination.startswith("dare") else None
    record.adapter = MIXTURE_LABEL
    return MixtureKey(parts, combination, body.density, seed)


def task_of(registry: Registry, location: SlotKey | None) -> Task:
    """What a resolved model serves, as far as the route must know: the base generates, and a mixture is never a
    classifier (the engine refuses to mix those)."""
    return registry.get(location.name).task if isinstance(location, AdapterLocation) else "generation"


def refuse_generation_parameters(task: str, adapter: str, parameters: BaseModel) -> None:
    """A classifier reads its input and answers with labels: a generation parameter sent to it is refused rather
    than silently ignored."""
    sent = sorted(parameters.model_fields_set)
    if task == "classification" and sent:
        raise InvalidInput(
            f"parameters.{sent[0]}",
            f"{adapter!r} is a classification adapter; generation parameters do not apply to it "
            f"(sent: {', '.join(sent)})",
        )


def validation_message(exc: RequestValidationError) -> str:
    """Every problem pydantic found, as 'field: problem' joined by '; ' (fields as `parameters.top_p`,
    `inputs[1]`; the query parameter `adapter` as itself)."""
    messages = []
    for error in exc.errors():
        where, *path = error["loc"]
        if error["type"] == "json_invalid":
            position = f" at character {path[0]}" if path else ""
            messages.append(f"body: not valid JSON{position}: {error.get('ctx', {}).get('error', error['msg'])}")
            continue
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or where
        messages.append(f"{field}: {error['msg']}")
    return "; ".join(messages)


def generation_params(
    settings: Settings,
    max_new_tokens: int | None,
    max_new_tokens_field: str,
    *,
    temperature: float,
    top_p: float,
    seed: int | None,
    stop: Sequence[str],
    chat: bool,
    ignore_eos: bool = False,
    logprobs: int | None = None,
    prompt_logprobs: bool = False,
) -> GenerationParams:
    max_new = settings.default_max_new_tokens if max_new_tokens is None else max_new_tokens
    if max_new > settings.max_new_tokens_limit:
        raise InvalidInput(max_new_tokens_field, f"{max_new} is over the limit of {settings.max_new_tokens_limit}")
    return GenerationParams(max_new, temperature, top_p, seed, tuple(stop), chat, ignore_eos,
                            logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def count_tokens(record: RequestRecord, results: Sequence[Result]) -> None:
    """Prompt and generated tokens into the request's record."""
    record.tokens_in += sum(r.prompt_tokens for r in results)
    record.tokens_out += sum(r.tokens for r in results if isinstance(r, GenerationResult))


def predict_output(result: Result) -> dict:
    """One /predict output; `logprobs` only when asked ("details": true), `prompt_logprobs` never (no echo here)."""
    output = asdict(result)
    if isinstance(result, GenerationResult):
        del output["prompt_logprobs"]
        if result.logprobs is None:
            del output["logprobs"]
        else:
            output["logprobs"] = [logprob_details(entry) for entry in result.logprobs]
    return output


def logprob_details(entry: TokenLogprob) -> dict:
    return {"token_id": entry.token_id, "logprob": entry.logprob}


def predict_body(adapter: str | None, task: Task, results: Sequence[Result]) -> dict:
    """The /predict answer; a streamed /predict ends with this same record."""
    return {"adapter": adapter, "task": task, "outputs": [predict_output(r) for r in results]}


def predict_events(
    record: RequestRecord, adapter: str | None, stream: Iterator[str | TokenLogprob | Result]
) -> Iterator[str]:
    """/predict as server-sent events: `delta` events with the new text, then one `result` event holding the
    non-streaming answer (an `error` event instead if the engine fails midway). With details, a `token` event
    per generated token ({token_id, logprob}) comes before the delta that holds its text."""
    try:
        for item in stream:
            if isinstance(item, TokenLogprob):
                yield sse(logprob_details(item), "token")
            elif isinstance(item, str):
                yield sse({"text": item}, "delta")
            else:
                count_tokens(record, [item])
                task: Task = "generation" if isinstance(item, GenerationResult) else "classification"
                yield sse(predict_body(adapter, task, [item]), "result")
    except Exception as exc:  # noqa: BLE001 - past the first byte, the error goes in the stream
        detail = str(exc) if isinstance(exc, LoraswapError) else internal_error_message()
        yield sse({"status": stream_failure(exc), "detail": detail}, "error")


def internal_error_message() -> str:
    """What a client is told of a failure that is not its fault: the request id to find it in the logs."""
    return f"internal error (request id {current_request().request_id})"


def stream_failure(exc: Exception) -> int:
    """The status a stream that failed after its first byte would have had; logged here, once, with the request
    id (the log filter adds it)."""
    if isinstance(exc, LoraswapError):
        log.warning("stream ended early: %s", exc)
        return status_of(exc)
    log.error("stream failed", exc_info=exc)
    return 500


def started(stream: Generator[T, None, None]) -> Generator[T, None, None]:
    """Run a stream up to its first item now, in the route, so that errors before it (unknown adapter, input too
    long) still get their HTTP status instead of a broken event stream."""
    first = next(stream)
    return _closing(itertools.chain([first], stream), stream)


def _closing(items: Iterator[T], source: Generator[T, None, None]) -> Generator[T, None, None]:
    try:
        yield from items
    finally:
        source.close()  # a client that disconnects stops the generation


def sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def event_stream(events: Iterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
