"""OpenAI-compatible files and fine-tuning routes: upload JSONL data, train an adapter on it, watch, cancel.

Thin: server/finetune.py stores files and runs jobs. Shapes and errors are OpenAI's (the official client works
unchanged); writes need the admin token, like adapter uploads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .deps import ServicesDep
from .errors import InvalidInput
from .finetune import LORA_DEFAULTS, JobSpec, base_shape
from .finetune_auto import block_layer_names
from .openai_api import OpenAIRoute
from .routes_adapters import AdminDep, _bounded_form


T = TypeVar("T")
MEDIA_TYPES = {".jsonl": "application/jsonl", ".csv": "text/csv", ".png": "image/png"}


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # "auto" is read as None (the same default) before the bounds apply: pydantic would compare "auto" with them
    # (a TypeError, a 500, found by schemathesis)
    n_epochs: int | float | None = Field(None, gt=0, le=1000)  # fractional allowed
    batch_size: int | None = Field(None, ge=1, le=256)
    learning_rate_multiplier: float | None = Field(None, gt=0, le=100)

    @field_validator("n_epochs", "batch_size", "learning_rate_multiplier", mode="before")
    @classmethod
    def _auto_is_default(cls, value: object) -> object:
        return None if value == "auto" else value


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"]
    supervised: Supervised | None = None


class JobRequest(BaseModel):
    """OpenAI's create-job body; our LoRA options ride in `metadata` (string values, as OpenAI's metadata)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, min_length=1, max_length=40)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list[dict] | None = Field(None, max_length=0)  # accepted only empty: nothing to integrate with


def _hyperparameters(body: JobRequest) -> Hyperparameters:
    nested = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    if nested is not None and body.hyperparameters is not None:
        raise InvalidInput("hyperparameters", "give hyperparameters either at the top level or under "
                                              "method.supervised, not both")
    return nested or body.hyperparameters or Hyperparameters()


def _lora_options(metadata: dict[str, str], max_rank: int, num_layers: int, max_context: int,
                  layer_names: list[str]) -> dict:
    """Our LoRA options from `metadata` (lora_rank, lora_alpha, lora_dropout, lora_target_modules, lora_top_layers,
    max_length, truncation; None where not given: auto); other metadata keys are the client's own tags.
    `layer_names`: the linear layers of the base's blocks, where LoRA can go."""
    unknown = sorted(k for k in metadata if k.startswith("lora_") and k not in LORA_DEFAULTS)
    if unknown:
        raise InvalidInput(f"metadata.{unknown[0]}", f"unknown LoRA option; known: {sorted(LORA_DEFAULTS)}")
    options = dict(LORA_DEFAULTS)

    def number(key: str, kind: Callable[[str], T], low: float, high: float) -> T:
        try:
            value = kind(metadata[key])
        except ValueError:
            raise InvalidInput(f"metadata.{key}", f"{metadata[key]!r} is not a {kind.__name__}") from None
        if not low <= value <= high:  # type: ignore[operator]
            raise InvalidInput(f"metadata.{key}", f"{value} is not between {low} and {high}")
        return value

    bounds: dict[str, tuple[Callable, float, float]] = {
        "lora_rank": (int, 1, max_rank), "lora_alpha": (float, 1e-6, 1e6), "lora_dropout": (float, 0.0, 0.9),
        "lora_top_layers": (int, 1, num_layers), "max_length": (int, 8, max_context),
    }
    for key, (kind, low, high) in bounds.items():
        if key in metadata:
            options[key] = number(key, kind, low, high)
    if "lora_target_modules" in metadata:
        modules = metadata["lora_target_modules"].replace(",", " ").split()
        bad = sorted(set(modules) - set(layer_names)) or ([] if modules else ["(none)"])
        if bad:
            raise InvalidInput("metadata.lora_target_modules", f"{bad[0]} is not one of the base's layers "
                                                               f"{sorted(layer_names)}")
        options["lora_target_modules"] = " ".join(dict.fromkeys(modules))
    if "truncation" in metadata:
        if metadata["truncation"] not in ("true", "false"):
            raise InvalidInput("metadata.truncation", f"{metadata['truncation']!r} is not 'true' or 'false'")
        options["truncation"] = metadata["truncation"] == "true"
    return options


def _page(items: Sequence[T], ids: Callable[[T], str], after: str | None, limit: int) -> tuple[list[T], bool]:
    """OpenAI's cursor pagination: the `limit` items after the one whose id is `after`."""
    start = 0
    if after is not None:
        positions = [i for i, item in enumerate(items) if ids(item) == after]
        if not positions:
            raise InvalidInput("after", f"no item {after!r} in this list")
        start = positions[0] + 1
    page = list(items[start:start + limit])
    return page, start + limit < len(items)


def _list_body(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


router = APIRouter(prefix="/v1", tags=["fine-tuning"], route_class=OpenAIRoute)


# ---- files ------------------------------------------------------------------------------------------------


@router.post("/files")
async def create_file(svc: ServicesDep, request: Request, _admin: AdminDep) -> dict:
    """Multipart `file` (JSONL) and `purpose=fine-tune`; every line is checked before it is stored."""
    form = await _bounded_form(request, svc.settings.max_file_bytes + 64 * 1024, 1)
    try:
        unknown = sorted(set(form) - {"file", "purpose"})
        if unknown:
            raise InvalidInput(unknown[0], "unknown form field; expected file and purpose")
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("file", "the form needs a 'file' part")
        if not isinstance(purpose, str):
            raise InvalidInput("purpose", "the form needs a 'purpose' field ('fine-tune')")
        record = await run_in_threadpool(svc.finetune.add_file, upload.filename or "", purpose, upload.file)
    finally:
        await form.close()
    return record.as_openai()


@router.get("/files")
def list_files(
    svc: ServicesDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict:
    records = [r for r in svc.finetune.files.records() if purpose is None or r.purpose == purpose]
    records = records[::-1] if order == "desc" else records
    page, has_more = _page(records, lambda r: r.id, after, limit)
    return _list_body([r.as_openai() for r in page], has_more)


@router.get("/files/{file_id}")
def get_file(svc: ServicesDep, file_id: str) -> dict:
    return svc.finetune.files.get(file_id).as_openai()


@router.get("/files/{file_id}/content", response_class=Response,
            responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}, "description": "The file as uploaded"}})
def file_content(svc: ServicesDep, file_id: str) -> Response:
    record = svc.finetune.files.get(file_id)
    return Response(svc.finetune.files.path(record).read_bytes(), media_type=MEDIA_TYPES[record.suffix])


@router.delete("/files/{file_id}")
def delete_file(svc: ServicesDep, file_id: str, _admin: AdminDep) -> dict:
    svc.finetune.delete_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


# ---- jobs -------------------------------------------------------------------------------------------------


@router.post("/fine_tuning/jobs")
def create_job(svc: ServicesDep, body: JobRequest, _admin: AdminDep) -> dict:
    engine = svc.ready_engine()
    if body.model != engine.info.name:
        raise InvalidInput("model", f"{body.model!r} cannot be fine-tuned here: adapters train on the loaded "
                                    f"base, {engine.info.name!r}")
    hyper = _hyperparameters(body)
    lora = _lora_options(body.metadata or {}, svc.settings.max_rank, engine.info.num_layers,
                         engine.info.max_context, block_layer_names(base_shape(engine).linear_paths))
    spec = JobSpec(
        model=body.model, training_file=body.training_file, validation_file=body.validation_file,
        suffix=body.suffix, seed=0 if body.seed is None else body.seed, n_epochs=hyper.n_epochs,
        batch_size=hyper.batch_size, learning_rate_multiplier=hyper.learning_rate_multiplier, lora=lora,
        metadata=body.metadata,
    )
    return svc.finetune.create_job(spec, engine).as_openai()


@router.get("/fine_tuning/jobs")
def list_jobs(
    svc: ServicesDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict:
    page, has_more = _page(svc.finetune.jobs(), lambda j: j.id, after, limit)
    return _list_body([j.as_openai() for j in page], has_more)


@router.get("/fine_tuning/jobs/{job_id}")
def get_job(svc: ServicesDep, job_id: str) -> dict:
    return svc.finetune.get(job_id).as_openai()


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(svc: ServicesDep, job_id: str, _admin: AdminDep) -> dict:
    return svc.finetune.cancel(job_id).as_openai()


@router.get("/fine_tuning/jobs/{job_id}/events")
def job_events(svc: ServicesDep, job_id: str, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 20) -> dict:
    page, has_more = _page(svc.finetune.events(job_id), lambda e: e["id"], after, limit)
    return _list_body(page, has_more)

