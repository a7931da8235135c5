"""A collection's documents over HTTP: list, upload, delete (app/library.py does the work, as for
the UI and the CLI). Uploads' sources are shown as their file names, never as paths on the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import library
from app.api.deps import Key, Service, existing, readable, writable
from app.api.errors import ERRORS, ApiError
from app.api.schemas import UPLOAD_BODY, Deleted, DocumentOut, UploadResponse, UploadResult

router = APIRouter()


@router.get("/v1/collections/{collection}/documents", response_model=list[DocumentOut], responses=ERRORS)
def list_documents(collection: str, key: Key, svc: Service) -> list[dict[str, Any]]:
    """The documents of a collection, with status and error."""
    readable(key, collection)
    existing(svc, collection)
    home = svc.kb.home
    return [{**d, "source": library.display_source(home, d["source"])} for d in library.list_documents(svc.kb, collection)]


@router.post("/v1/collections/{collection}/documents", response_model=UploadResponse, responses=ERRORS,
             openapi_extra=UPLOAD_BODY)
async def upload(collection: str, request: Request, key: Key, svc: Service) -> UploadResponse:
    """Upload files into a collection (created if new); each is ingested and reported."""
    # The key may write here before a byte of the body is parsed; the form is read under
    # limits (files, fields, field size), and each file is copied to disk in blocks.
    writable(key, collection)
    most = svc.settings.api_max_files
    try:
        form = await request.form(max_files=most, max_fields=most, max_part_size=64 * 1024)
    except StarletteHTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise ApiError(400, f"At most {most} files per request (MOERAG_API_MAX_FILES).", param="files",
                           code="too_many_files") from None
        raise ApiError(400, f"Unreadable multipart body: {exc.detail}", param="files") from None
    try:
        files = [v for name, v in form.multi_items() if name == "files" and isinstance(v, StarletteUploadFile)]
        if not files:
            raise ApiError(400, "No files in the request (multipart field 'files').", param="files")
        payload = [(f.filename or "upload", f.file) for f in files]
        report = await run_in_threadpool(library.ingest_uploads, svc.kb, svc.embedder, payload, collection=collection,
                                         settings=svc.settings)
    finally:
        await form.close()  # Starlette's spooled temporary files go now, whatever happened
    home = svc.kb.home
    results = [UploadResult(filename=name, status=r.status, chunks=r.chunks, error=scrub(r.error, r.source, home))
               for (name, _), r in zip(payload, report.results)]
    return UploadResponse(collection=collection, results=results)


@router.delete("/v1/collections/{collection}/documents/{document_id}", response_model=Deleted, responses=ERRORS)
def delete_document(collection: str, document_id: int, key: Key, svc: Service) -> Deleted:
    """Delete a document (its chunks and vectors too)."""
    writable(key, collection)
    existing(svc, collection)
    library.delete_documents(svc.kb, collection, [document_id], lock_wait=svc.settings.lock_wait)
    return Deleted(deleted=[document_id])


def scrub(message: str | None, source: str, home: Path) -> str | None:
    """A per-file error as an API client may see it: no path on this server."""
    if message is None:
        return None
    message = message.replace(source, library.display_source(home, source))
    return message.replace(str(home), "<data directory>")
