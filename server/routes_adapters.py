"""HTTP routes of the adapter registry: list, show, upload (or replace), delete, download, and the two files of an
adapter the console shows (its loraswap.json and its training.png).

Thin: the registry stores, the engine checks and (un)loads; domain errors become statuses in deps.py's one table.
Write routes need the admin bearer token; the upload body is bounded while it streams, before it is parsed.
"""

from __future__ import annotations

import json
import logging
import secrets
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Security
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from .adapter_format import METADATA_FILE
from .archive import ArchiveLimits, write_zip
from .deps import ServicesDep
from .engine_api import EngineAPI
from .errors import AdapterChanged, Forbidden, InvalidInput, PayloadTooLarge, Unauthorized
from .registry import NAME_PATTERN, AdapterRecord

log = logging.getLogger(__name__)
router = APIRouter(tags=["adapters"])
FORM_FIELDS = {"name", "replace"}
TRAINING_PLOT = "training.png"  # the loss curves train-adapter draws beside the adapter
# The upload form as /openapi.json describes it (the route parses the form itself, bounded while it streams, so
# FastAPI cannot derive it): Swagger UI at /docs and generated clients send exactly these fields.
UPLOAD_FORM = {
    "type": "object",
    "required": ["name", "files"],
    "properties": {
        "name": {"type": "string", "pattern": f"^{NAME_PATTERN.pattern}$", "description": "The adapter's name.",
                 "examples": ["my-adapter"]},
        "replace": {"type": "boolean", "default": False,
                    "description": "Replace an adapter of this name with a new version (else: 409)."},
        "files": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "The adapter folder's files (adapter_config.json, adapter_model.safetensors, optional "
                           "loraswap.json), or one .zip / .tar.gz of them.",
        },
    },
}


# the admin token as an OpenAPI security scheme: every write operation names it, so Swagger UI (/docs) shows an
# Authorize button and sends the header (a plain header parameter named Authorization is dropped by OpenAPI tools)
ADMIN_BEARER = HTTPBearer(scheme_name="adminToken", auto_error=False,
                          description="The server's admin token (LORASWAP_ADMIN_TOKEN / --admin-token).")


def require_admin(
    svc: ServicesDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(ADMIN_BEARER)]
) -> None:
    token = svc.settings.admin_token
    if token is None:
        raise Forbidden(
            "adapter uploads, replacements and deletions are disabled: start the server with an admin token "
            "(LORASWAP_ADMIN_TOKEN=... or --admin-token ...) and send it as 'Authorization: Bearer <token>'"
        )
    given = credentials.credentials if credentials is not None else ""  # None: no header, or not a bearer one
    if not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise Unauthorized("a valid admin token is required: 'Authorization: Bearer <token>'")


AdminDep = Annotated[None, Depends(require_admin)]


def _shown(engine: EngineAPI, record: AdapterRecord) -> dict:
    return dict(record.as_dict(), loaded=engine.is_loaded(record.name))


@router.get("/adapters")
def list_adapters(svc: ServicesDep) -> dict:
    engine = svc.ready_engine()
    return {"base": engine.info.name, "adapters": [_shown(engine, r) for r in svc.registry.records()],
            "mixtures": engine.mixtures(), "skipped": svc.registry.skipped()}


@router.get("/adapters/{name}")
def get_adapter(name: str, svc: ServicesDep) -> dict:
    return _shown(svc.ready_engine(), svc.registry.get(name))


@router.post(
    "/adapters",
    status_code=201,
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": UPLOAD_FORM}}}},
)
async def upload_adapter(request: Request, svc: ServicesDep, _admin: AdminDep) -> JSONResponse:
    """Multipart: `name`, optional `replace=true`, and either one .zip/.tar.gz or the adapter's files."""
    engine = svc.ready_engine()
    settings = svc.settings
    form = await _bounded_form(request, settings.max_upload_bytes, settings.max_archive_members)
    try:
        unknown = sorted(k for k, v in form.multi_items() if not isinstance(v, UploadFile) and k not in FORM_FIELDS)
        if unknown:
            raise InvalidInput("form", f"unknown fields {unknown}; expected name, replace and files")
        name, replace = form.get("name"), str(form.get("replace", "false")).lower()
        if not isinstance(name, str):
            raise InvalidInput("name", "the form field 'name' is required")
        if replace not in ("true", "false", "1", "0"):
            raise InvalidInput("replace", f"{replace!r} is not a boolean (true or false)")
        uploads = [(f.filename or "", f.file) for _, f in form.multi_items() if isinstance(f, UploadFile)]
        limits = ArchiveLimits(settings.max_archive_members, settings.max_uncompressed_bytes)
        record, replaced = await run_in_threadpool(
            svc.registry.add, name, uploads, engine.check_adapter, limits, replace in ("true", "1")
        )
    finally:
        await form.close()
    if replaced is not None:
        await run_in_threadpool(engine.unload, name)  # in-flight requests finish on the old version
    return JSONResponse(status_code=201, content=dict(record.as_dict(), loaded=False))


@router.delete("/adapters/{name}")
def delete_adapter(name: str, svc: ServicesDep, _admin: AdminDep) -> dict:
    engine = svc.ready_engine()
    record = svc.registry.delete(name)
    engine.unload(name)
    svc.metrics.forget(name)
    return {"deleted": name, "version": record.version}


@router.get("/adapters/{name}/download", response_class=FileResponse,
            responses={200: {"content": {"application/zip": {}}, "description": "The adapter as a zip"}})
def download_adapter(name: str, svc: ServicesDep) -> FileResponse:
    """The current version as a zip of one folder `<name>/`, loadable with PeftModel.from_pretrained."""
    record = svc.registry.get(name)
    with tempfile.NamedTemporaryFile(suffix=".zip", delete=False) as handle:
        path = Path(handle.name)
        try:
            write_zip(record.folder, handle, name)
        except BaseException as exc:
            path.unlink()
            if isinstance(exc, OSError) and not record.folder.is_dir():  # deleted or replaced while we zipped it
                raise AdapterChanged(name) from None
            raise
    return FileResponse(path, media_type="application/zip", filename=f"{name}-v{record.version}.zip",
                        background=BackgroundTask(path.unlink))


@router.get("/adapters/{name}/metadata")
def adapter_metadata(name: str, svc: ServicesDep) -> dict:
    """The adapter's loraswap.json as stored: task, labels, metrics, training settings and data hashes."""
    record = svc.registry.get(name)
    try:
        text = (record.folder / METADATA_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        if not record.folder.is_dir():
            raise AdapterChanged(name) from None
        raise HTTPException(404, f"adapter {name!r} has no {METADATA_FILE}") from None
    return json.loads(text)  # valid: the registry's check parsed it before the adapter became visible


@router.get("/adapters/{name}/training.png", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}, "description": "The training loss plot"}})
def training_plot(name: str, svc: ServicesDep) -> FileResponse:
    """The adapter's loss plot and no other file of its folder."""
    record = svc.registry.get(name)
    path = record.folder / TRAINING_PLOT
    if not path.is_file():
        if not record.folder.is_dir():
            raise AdapterChanged(name)
        raise HTTPException(404, f"adapter {name!r} has no {TRAINING_PLOT}")
    # an uploaded file is untrusted: never let a browser sniff it into HTML
    return FileResponse(path, media_type="image/png", headers={"X-Content-Type-Options": "nosniff"})


async def _bounded_form(request: Request, limit: int, max_files: int) -> FormData:
    """Parse the multipart body, refusing it (413) as soon as more than `limit` bytes have arrived."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes, over the limit of {limit}")
    received = 0

    async def receive() -> dict:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        return message

    if b"boundary=" not in request.headers.get("content-type", "").encode("latin-1"):
        raise InvalidInput("body", "a multipart/form-data body needs a boundary in its Content-Type")
    return await Request(request.scope, receive).form(max_files=max_files, max_fields=len(FORM_FIELDS))
