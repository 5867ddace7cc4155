"""The collaboration service as a FastAPI application (see :func:`create_app`).

Devices upload "uplink" payloads (opaque bytes plus a JSON manifest) in resumable chunks and pull
the "updates" (opaque bytes) the cloud published for them; an administrator registers devices,
publishes updates and reads uploads. Every payload is identified and checked by its SHA-256.

Authentication is ``Authorization: Bearer <token>``. Device tokens are random, stored only as
their SHA-256 and compared in constant time; so is the admin token. A device sees only its own
uploads and updates: anything else answers 404 exactly as if it did not exist. Errors are JSON
objects ``{"error": "..."}`` (plus fields such as ``offset`` where they help the client resync).
Nothing here logs request headers, so tokens never reach the log.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tokensieve.errors import InputError

from .store import NotFound, Store, StoreError, TooLarge, is_device_id, is_sha256, is_upload_id, token_digest

__all__ = ["ApiError", "create_app"]

MiB = 1 << 20
GiB = 1 << 30

_log = logging.getLogger("tokensieve.collab.service")

_JSON_LIMIT = 256 * 1024        # begin / create-device bodies
_MANIFEST_LIMIT = 1 << 20       # serialized manifest (as tokensieve.collab.uplink.MAX_MANIFEST: ~150 B per uplinked sample)
_NAME_LIMIT = 200
_TOKEN_LIMIT = 512
_MAX_INT = (1 << 62)
_ROUND = re.compile(r"[0-9]{1,15}")
_OFFSET = re.compile(r"[0-9]{1,18}")
_RANGE = re.compile(r"bytes=([0-9]{0,18})-([0-9]{0,18})")
_SEND_BLOCK = 256 * 1024


class ApiError(Exception):
    """An error answered as ``{"error": message, **extra}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.extra = extra


@dataclasses.dataclass(frozen=True)
class _Principal:
    """Who is calling: the administrator, or one device."""

    admin: bool
    device_id: str | None = None


# ---------------------------------------------------------------------------------------------
# Parsing helpers (all raise ApiError 4xx on bad input)
# ---------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_round(text: str) -> int:
    if _ROUND.fullmatch(text) is None:
        raise ApiError(400, "round must be a non-negative integer (at most 15 digits)")
    return int(text)


def _parse_sha(value: object, what: str) -> str:
    if not isinstance(value, str) or not is_sha256(value.lower()):
        raise ApiError(400, f"{what} must be a SHA-256 hex digest (64 hex digits)")
    return value.lower()


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_inclusive)`` for a single ``bytes=`` range, None to send everything.

    Raises ApiError 416 when the range cannot be satisfied. Unparseable or multi-range headers
    are ignored (RFC 9110 allows serving the whole representation).
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # suffix range: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise ApiError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{size}"}, size=size)
        return max(0, size - length), size - 1
    start = int(first)
    end = size - 1 if not last else min(int(last), size - 1)
    if start >= size or (last and int(last) < start):
        raise ApiError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{size}"}, size=size)
    return start, end


async def _read_body(request: Request, limit: int, what: str, limit_name: str = "limit") -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes before reading them all; the
    error names the limit as ``limit_name`` so a client can adapt."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit() or len(declared) > 18:
            raise ApiError(400, "bad Content-Length header")
        if int(declared) > limit:
            raise ApiError(413, f"{what} larger than the limit of {limit} bytes", **{limit_name: limit})
    buf = bytearray()
    try:
        async for piece in request.stream():
            buf += piece
            if len(buf) > limit:
                raise ApiError(413, f"{what} larger than the limit of {limit} bytes", **{limit_name: limit})
    except ClientDisconnect:
        raise ApiError(400, "client disconnected before sending the whole body") from None
    return bytes(buf)


async def _read_json_object(request: Request) -> dict[str, Any]:
    raw = await _read_body(request, _JSON_LIMIT, "JSON body")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ApiError(400, "body must be a JSON object") from None
    if not isinstance(value, dict):
        raise ApiError(400, "body must be a JSON object")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _file_response(path: Path, size: int, sha256: str, range_header: str | None) -> Response:
    """The bytes of ``path`` (``size`` bytes), honouring a single ``Range``; with ETag."""
    span = _parse_range(range_header, size)
    headers = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}
    if span is None:
        start, end, status = 0, size - 1, 200
    else:
        start, end = span
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    length = end - start + 1 if size else 0
    headers["Content-Length"] = str(length)
    fh = open(path, "rb")  # opened here so a missing blob fails before the status line is sent

    def chunks() -> Iterator[bytes]:
        with fh:
            fh.seek(start)
            left = length
            while left > 0:
                block = fh.read(min(_SEND_BLOCK, left))
                if not block:
                    return
                left -= len(block)
                yield block

    return StreamingResponse(chunks(), status_code=status, headers=headers, media_type="application/octet-stream")


# ---------------------------------------------------------------------------------------------
# Application
# ---------------------------------------------------------------------------------------------


def create_app(
    root: Path,
    admin_token: str,
    *,
    max_body: int = 64 * MiB,
    max_chunk: int = 8 * MiB,
    device_quota: int = 1 * GiB,
) -> FastAPI:
    """The service storing its state under ``root``.

    ``admin_token`` authorises the admin endpoints (at least 16 characters). ``max_body`` caps the
    size of an upload or update, ``max_chunk`` the body of one upload chunk, and ``device_quota``
    is the default per-device quota (sum of declared upload sizes) in bytes.
    """
    if not isinstance(admin_token, str) or len(admin_token.strip()) < 16:
        raise InputError("admin_token must be a string of at least 16 characters")
    for name, value in (("max_body", max_body), ("max_chunk", max_chunk), ("device_quota", device_quota)):
        if not _is_int(value) or value < 1:
            raise InputError(f"{name} must be a positive integer number of bytes, got {value!r}")
    admin_digest = token_digest(admin_token.strip())
    store = Store(Path(root))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()

    app = FastAPI(
        title="tokensieve collaboration service", lifespan=lifespan,
        docs_url=None, redoc_url=None, openapi_url=None,
    )
    app.state.store = store

    # -- errors --------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _json_error(exc.status, exc.message, exc.headers, **exc.extra)

    @app.exception_handler(StoreError)
    async def _store_error(_request: Request, exc: StoreError) -> JSONResponse:
        return _json_error(exc.status, exc.message, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json_error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, _exc: RequestValidationError) -> JSONResponse:
        return _json_error(400, "bad request parameters")

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
        _log.error("internal error: %s: %s", type(exc).__name__, exc)
        return _json_error(500, "internal server error")

    # -- auth ----------------------------------------------------------------------------------

    def _lookup(token: str) -> _Principal | None:
        if hmac.compare_digest(token_digest(token), admin_digest):
            return _Principal(admin=True)
        device_id = store.device_for_token(token)
        return None if device_id is None else _Principal(admin=False, device_id=device_id)

    async def authenticate(request: Request) -> _Principal:
        header = request.headers.get("authorization")
        unauthorized = ApiError(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
        if header is None:
            raise unauthorized
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > _TOKEN_LIMIT:
            raise unauthorized
        principal = await run_in_threadpool(_lookup, token)
        if principal is None:
            raise unauthorized
        return principal

    async def require_admin(request: Request) -> None:
        if not (await authenticate(request)).admin:
            raise ApiError(403, "this endpoint needs the admin token")

    async def require_device(request: Request) -> str:
        principal = await authenticate(request)
        if principal.device_id is None:
            raise ApiError(403, "this endpoint needs a device token")
        return principal.device_id

    def _device_query(request: Request) -> str | None:
        device = request.query_params.get("device")
        if device is None or device == "":
            return None
        if not is_device_id(device) or not store.device_exists(device):
            raise NotFound("no such device")
        return device

    # -- routes --------------------------------------------------------------------------------

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        """Liveness probe; no authentication."""
        return {"ok": True}

    @app.post("/v1/devices", status_code=201)
    async def create_device(request: Request) -> dict[str, Any]:
        """Register a device (admin). Body ``{"name": str, "quota": int?}``; the token is shown once."""
        await require_admin(request)
        body = await _read_json_object(request)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > _NAME_LIMIT or not name.isprintable():
            raise ApiError(400, f"name must be a non-empty printable string of at most {_NAME_LIMIT} characters")
        quota = body.get("quota")
        if quota is None:
            quota = device_quota
        elif not _is_int(quota) or not 0 <= quota <= _MAX_INT:
            raise ApiError(400, "quota must be a non-negative integer number of bytes")
        device_id, token = await run_in_threadpool(store.create_device, name.strip(), quota)
        return {"device_id": device_id, "token": token, "quota": quota}

    @app.get("/v1/devices")
    async def list_devices(request: Request) -> list[dict[str, Any]]:
        """All devices (admin); never their tokens."""
        await require_admin(request)
        return await run_in_threadpool(store.list_devices)

    @app.post("/v1/uploads")
    async def begin_upload(request: Request) -> JSONResponse:
        """Start (201) or find again (200) a resumable upload of this device; the answer is the
        upload's status plus ``max_chunk``, the largest chunk the server accepts."""
        device_id = await require_device(request)
        body = await _read_json_object(request)
        upload_id, size, manifest = body.get("upload_id"), body.get("size"), body.get("manifest", {})
        if not is_upload_id(upload_id):
            raise ApiError(400, "upload_id must be 8-64 characters of A-Z a-z 0-9 _ -")
        if not _is_int(size) or size < 0:
            raise ApiError(400, "size must be a non-negative integer")
        if size > max_body:
            raise ApiError(413, f"size {size} is larger than the limit of {max_body} bytes", max_body=max_body)
        sha256 = _parse_sha(body.get("sha256"), "sha256")
        if not isinstance(manifest, dict):
            raise ApiError(400, "manifest must be a JSON object")
        try:
            manifest_size = len(json.dumps(manifest, separators=(",", ":"), allow_nan=False))
        except ValueError:  # 1e400 parses as infinity, which JSON cannot carry back
            raise ApiError(400, "manifest must hold only finite numbers") from None
        if manifest_size > _MANIFEST_LIMIT:
            raise ApiError(413, f"manifest larger than {_MANIFEST_LIMIT} bytes of JSON")
        info, created = await run_in_threadpool(store.begin_upload, device_id, upload_id, size, sha256, manifest)
        return JSONResponse({**info.to_json(), "max_chunk": max_chunk}, status_code=201 if created else 200)

    @app.put("/v1/uploads/{upload_id}")
    async def put_chunk(upload_id: str, request: Request) -> dict[str, Any]:
        """Append the raw body at ``Upload-Offset``, which must equal the durable offset."""
        device_id = await require_device(request)
        offset_text = request.headers.get("upload-offset")
        if offset_text is None or _OFFSET.fullmatch(offset_text.strip()) is None:
            raise ApiError(400, "Upload-Offset header must be a non-negative integer")
        offset = int(offset_text.strip())
        if not is_upload_id(upload_id):
            raise NotFound("no such upload")
        data = await _read_body(request, max_chunk, "chunk", "max_chunk")
        new = await run_in_threadpool(store.append_chunk, device_id, upload_id, offset, data)
        return {"offset": new}

    @app.post("/v1/uploads/{upload_id}/complete")
    async def complete_upload(upload_id: str, request: Request) -> dict[str, Any]:
        """Verify size and SHA-256 of the received bytes and store them; idempotent."""
        device_id = await require_device(request)
        if not is_upload_id(upload_id):
            raise NotFound("no such upload")
        info = await run_in_threadpool(store.complete_upload, device_id, upload_id)
        return {"upload_id": info.upload_id, "sha256": info.sha256, "size": info.size, "complete": True}

    @app.get("/v1/uploads")
    async def list_uploads(request: Request) -> list[dict[str, Any]]:
        """The caller's uploads (device), or all / one device's (admin, ``?device=``)."""
        principal = await authenticate(request)
        if principal.admin:
            device = await run_in_threadpool(_device_query, request)
        else:
            device = principal.device_id
        infos = await run_in_threadpool(store.list_uploads, device)
        return [info.to_json() for info in infos]

    @app.get("/v1/uploads/{upload_id}")
    async def upload_status(upload_id: str, request: Request) -> dict[str, Any]:
        """Offset, size, digest, completeness and manifest of one upload."""
        principal = await authenticate(request)
        device = await run_in_threadpool(_device_query, request) if principal.admin else principal.device_id
        info = await run_in_threadpool(store.get_upload, upload_id, device)
        return info.to_json()

    @app.get("/v1/uploads/{upload_id}/data")
    async def upload_data(upload_id: str, request: Request) -> Response:
        """The bytes of a complete upload (admin), with ``Range`` support."""
        await require_admin(request)
        device = await run_in_threadpool(_device_query, request)
        info = await run_in_threadpool(store.get_upload, upload_id, device)
        if not info.complete:
            raise ApiError(409, "upload is not complete", offset=info.offset)
        return await run_in_threadpool(
            _file_response, store.blob_path(info.sha256), info.size, info.sha256, request.headers.get("range")
        )

    @app.put("/v1/devices/{device_id}/updates/{round_text}")
    async def put_update(device_id: str, round_text: str, request: Request) -> JSONResponse:
        """Publish an update for a device (admin): raw body, ``Content-SHA256`` header."""
        await require_admin(request)
        round_ = _parse_round(round_text)
        expected = _parse_sha(request.headers.get("content-sha256"), "Content-SHA256 header")
        if not await run_in_threadpool(store.device_exists, device_id):
            raise NotFound("no such device")
        existing = await run_in_threadpool(store.find_update, device_id, round_)
        if existing is not None:
            if existing.sha256 != expected:
                raise ApiError(409, f"round {round_} already holds a different update", sha256=existing.sha256)
            return JSONResponse(existing.to_json(), status_code=200)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise TooLarge(f"body larger than the limit of {max_body} bytes", max_body=max_body)
        writer = await run_in_threadpool(store.blob_writer, max_body)
        try:
            pending = bytearray()
            async for piece in request.stream():
                pending += piece
                if len(pending) >= MiB:
                    await run_in_threadpool(writer.write, bytes(pending))
                    pending.clear()
            await run_in_threadpool(writer.write, bytes(pending))
            sha256, size = await run_in_threadpool(writer.commit, expected)
        except ClientDisconnect:
            raise ApiError(400, "client disconnected before sending the whole body") from None
        finally:
            writer.abort()  # no-op after a commit
        info, created = await run_in_threadpool(store.add_update, device_id, round_, sha256, size)
        return JSONResponse(info.to_json(), status_code=201 if created else 200)

    @app.get("/v1/updates")
    async def list_updates(request: Request) -> list[dict[str, Any]]:
        """This device's updates, by round."""
        device_id = await require_device(request)
        return [u.to_json() for u in await run_in_threadpool(store.list_updates, device_id)]

    @app.get("/v1/updates/latest")
    async def latest_update(request: Request) -> dict[str, Any]:
        """Metadata of this device's highest round (404 when there is none)."""
        device_id = await require_device(request)
        return (await run_in_threadpool(store.latest_update, device_id)).to_json()

    @app.get("/v1/updates/{round_text}")
    async def get_update(round_text: str, request: Request) -> Response:
        """The bytes of one of this device's updates, with ETag and ``Range`` support."""
        device_id = await require_device(request)
        try:
            round_ = _parse_round(round_text)
        except ApiError:
            raise NotFound("no such update") from None
        info = await run_in_threadpool(store.get_update, device_id, round_)
        return await run_in_threadpool(
            _file_response, store.blob_path(info.sha256), info.size, info.sha256, request.headers.get("range")
        )

    return app

