"""HTTP client of the collaboration service (device and admin sides), built on httpx.

Uploads are resumable: the client asks the server for the durable offset, sends the remaining
chunks, and after a dropped connection or a 5xx waits ``backoff`` seconds and continues from the
offset the server reports. Downloads resume with ``Range`` and are verified against their SHA-256
before any byte is returned. Every retry loop is bounded by ``retries``: one call spends at most
about ``retries × (timeout + backoff)`` seconds on failed attempts.

Errors: a 4xx answer raises :class:`~tokensieve.errors.InputError` carrying the server's message;
running out of retries or bytes that fail verification raise :class:`CloudError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import httpx

from tokensieve.errors import InputError, TokensieveError

__all__ = ["CloudClient", "CloudError"]

MiB = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)")


class CloudError(TokensieveError):
    """The service could not be reached or kept failing (after the allowed retries), or data
    it sent failed verification."""


class _Retryable(Exception):
    """A 5xx answer worth retrying."""


def _error_message(resp: httpx.Response) -> str:
    """The ``error`` field of a JSON error body, else a short description."""
    try:
        body = resp.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    return f"HTTP {resp.status_code}"


def _json_or_empty(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except (ValueError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _is_retryable_status(status: int) -> bool:
    return status >= 500 and status != 507


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _progress(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar (disabled unless ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled, leave=False)


class CloudClient:
    """Talks to one collaboration service with one bearer token (a device's or the admin's).

    ``timeout`` is httpx's per-operation timeout in seconds, ``retries`` the number of failed
    attempts (connection errors, timeouts, 5xx) tolerated per call, ``backoff`` the wait in
    seconds before each retry, ``verify`` TLS verification: a bool, a CA bundle path or an
    :class:`ssl.SSLContext`.
    ``transport`` replaces httpx's transport (tests inject failures through it).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.2,
        verify: bool | str | ssl.SSLContext = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not isinstance(token, str) or not token.strip():
            raise InputError("token must be a non-empty string")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise InputError(f"retries must be a non-negative integer, got {retries!r}")
        if not timeout > 0 or not backoff >= 0:
            raise InputError(f"timeout must be > 0 and backoff >= 0, got timeout={timeout!r} backoff={backoff!r}")
        if isinstance(verify, (str, os.PathLike)):  # a CA bundle
            verify = ssl.create_default_context(cafile=os.fspath(verify))
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff = float(backoff)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token.strip()}"},
            timeout=timeout,
            verify=verify,
            transport=transport,
            follow_redirects=False,
        )

    # -- plumbing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the underlying connections."""
        self._http.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never show the token
        return f"CloudClient({self.base_url!r})"

    def _failed(self, failures: int, what: str, exc: BaseException) -> int:
        """Count one failure; sleep ``backoff`` or raise CloudError when retries are spent."""
        failures += 1
        if failures > self.retries:
            raise CloudError(f"{what} failed after {self.retries} retries: {exc}") from exc
        time.sleep(self.backoff)
        return failures

    def _request(self, method: str, path: str, *, idempotent: bool = True, ok: tuple[int, ...] = (),
                 **kwargs: Any) -> httpx.Response:
        """Send with bounded retries; return 2xx answers and those in ``ok``, raise on the rest.

        Connection failures before anything was sent are always retried; other transport errors
        and 5xx only when the request is ``idempotent``.
        """
        failures = 0
        while True:
            try:
                resp = self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                failures = self._failed(failures, f"{method} {path}", exc)
                continue
            except httpx.TransportError as exc:
                if not idempotent:
                    raise CloudError(f"{method} {path} failed: {exc}") from exc
                failures = self._failed(failures, f"{method} {path}", exc)
                continue
            if resp.is_success or resp.status_code in ok:
                return resp
            if _is_retryable_status(resp.status_code) and idempotent:
                failures = self._failed(failures, f"{method} {path}", _Retryable(_error_message(resp)))
                continue
            self._raise_for(resp)

    @staticmethod
    def _raise_for(resp: httpx.Response) -> None:
        """InputError for a 4xx (or 507 over quota), CloudError for other failures."""
        message = _error_message(resp)
        if 400 <= resp.status_code < 500 or resp.status_code == 507:
            raise InputError(f"service refused the request ({resp.status_code}): {message}")
        raise CloudError(f"service failed ({resp.status_code}): {message}")

    # -- device side -----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``."""
        return self._request("GET", "/v1/health").json()

    def begin_upload(self, upload_id: str, size: int, sha256: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Start an upload, or find the same one again; returns its status (with ``offset``)."""
        return self._request(
            "POST", "/v1/uploads",
            json={"upload_id": upload_id, "size": size, "sha256": sha256, "manifest": manifest},
        ).json()

    def send_chunk(self, upload_id: str, offset: int, data: bytes) -> int:
        """One ``PUT`` of ``data`` at ``offset`` (no retries); returns the new offset.

        A 409 (wrong offset) raises InputError; :meth:`upload` handles resyncing itself.
        """
        resp = self._http.put(f"/v1/uploads/{upload_id}", content=data, headers={"Upload-Offset": str(offset)})
        if not resp.is_success:
            self._raise_for(resp)
        return int(resp.json()["offset"])

    def complete_upload(self, upload_id: str) -> dict[str, Any]:
        """Ask the server to verify and store the upload (idempotent)."""
        return self._request("POST", f"/v1/uploads/{upload_id}/complete").json()

    def upload_status(self, upload_id: str) -> dict[str, Any]:
        """Status of one of this device's uploads: offset, size, sha256, complete, manifest."""
        return self._request("GET", f"/v1/uploads/{upload_id}").json()

    def uploads(self) -> list[dict[str, Any]]:
        """This device's uploads."""
        return self._request("GET", "/v1/uploads").json()

    @staticmethod
    def default_upload_id(data: bytes, manifest: dict[str, Any]) -> str:
        """The upload id :meth:`upload` uses when none is given: derived from the bytes and the
        manifest, so uploading the same thing again resumes (or finds) the same upload."""
        canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(_sha256(data).encode() + b"\n" + canonical.encode()).hexdigest()[:48]

    def upload(
        self,
        data: bytes,
        manifest: dict[str, Any],
        upload_id: str | None = None,
        chunk_size: int = MiB,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Upload ``data`` with ``manifest`` resumably; returns ``{"upload_id", "sha256", "size"}``.

        Resumes from the server's durable offset (also across calls: the default ``upload_id`` is
        derived from data and manifest). Raises InputError with the server's message on a 4xx and
        CloudError when the allowed retries are spent.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InputError(f"data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if not isinstance(manifest, dict):
            raise InputError(f"manifest must be a dict, got {type(manifest).__name__}")
        try:
            json.dumps(manifest, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InputError(f"manifest must be JSON-serialisable: {exc}") from None
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        upload_id = upload_id if upload_id is not None else self.default_upload_id(data, manifest)
        size, sha256 = len(data), _sha256(data)
        status = self.begin_upload(upload_id, size, sha256, manifest)
        offset: int | None = int(status["offset"])
        if isinstance(status.get("max_chunk"), int) and status["max_chunk"] > 0:
            chunk_size = min(chunk_size, status["max_chunk"])
        failures = 0
        with _progress(size, progress, "upload") as bar:
            bar.update(offset)
            while True:
                try:
                    if offset is None:  # after a failure: ask where the server stands
                        resp = self._http.get(f"/v1/uploads/{upload_id}")
                        self._check_or_retry(resp)
                        offset = int(resp.json()["offset"])
                        bar.reset(total=size)
                        bar.update(offset)
                    if offset < size:
                        chunk = data[offset:offset + chunk_size]
                        resp = self._http.put(
                            f"/v1/uploads/{upload_id}", content=chunk, headers={"Upload-Offset": str(offset)}
                        )
                        if resp.status_code == 409 and "offset" in _json_or_empty(resp):
                            offset = self._resync(offset, int(_json_or_empty(resp)["offset"]), bar)
                            continue
                        limit = _json_or_empty(resp).get("max_chunk") if resp.status_code == 413 else None
                        if isinstance(limit, int) and 0 < limit < len(chunk):
                            chunk_size = limit  # the server takes smaller chunks than we sent
                            continue
                        self._check_or_retry(resp)
                        new = int(resp.json()["offset"])
                        bar.update(new - offset)
                        offset = new
                        continue
                    resp = self._http.post(f"/v1/uploads/{upload_id}/complete")
                    if resp.status_code == 409 and "offset" in _json_or_empty(resp):
                        offset = self._resync(offset, int(_json_or_empty(resp)["offset"]), bar)
                        continue
                    self._check_or_retry(resp)
                    return resp.json()
                except (httpx.TransportError, _Retryable) as exc:
                    failures = self._failed(failures, f"upload {upload_id}", exc)
                    offset = None

    def _check_or_retry(self, resp: httpx.Response) -> None:
        """Return on 2xx; raise _Retryable for a retryable 5xx; raise InputError/CloudError else."""
        if resp.is_success:
            return
        if _is_retryable_status(resp.status_code):
            raise _Retryable(f"HTTP {resp.status_code}: {_error_message(resp)}")
        self._raise_for(resp)

    @staticmethod
    def _resync(old: int, new: int, bar: Any) -> int:
        """Adopt the offset the server reported in a 409; a report that does not move is a bug."""
        if new == old:
            raise CloudError(f"server refused offset {old} but reports the same offset; giving up")
        bar.reset(total=bar.total)
        bar.update(new)
        return new

    def updates(self) -> list[dict[str, Any]]:
        """This device's updates: ``[{"round", "size", "sha256", "created"}, ...]``."""
        return self._request("GET", "/v1/updates").json()

    def latest_update(self) -> dict[str, Any]:
        """Metadata of this device's highest round; InputError if there is none."""
        return self._request("GET", "/v1/updates/latest").json()

    def pull(self, round: int | str = "latest", dest: Path | str | None = None, progress: bool = False) -> bytes:
        """Download an update (``"latest"`` or a round number), verify it, return its bytes.

        With ``dest`` the bytes are also left in that file (written as ``dest.part`` first,
        which a later call resumes). A dropped connection resumes with ``Range``; the SHA-256 is
        checked against the update's metadata and ETag, and unverified bytes are never returned
        (CloudError instead).
        """
        if round == "latest":
            meta = self.latest_update()
        else:
            if isinstance(round, bool) or not isinstance(round, (int, str)) or not str(round).isdigit():
                raise InputError(f"round must be 'latest' or a non-negative integer, got {round!r}")
            wanted = int(round)
            found = [u for u in self.updates() if u.get("round") == wanted]
            if not found:
                raise InputError(f"no update with round {wanted} for this device")
            meta = found[0]
        return self._download(f"/v1/updates/{int(meta['round'])}", int(meta["size"]), str(meta["sha256"]),
                              dest, progress, f"update {meta['round']}")

    # -- admin side --------------------------------------------------------------------------

    def create_device(self, name: str, quota: int | None = None) -> dict[str, Any]:
        """Register a device; returns ``{"device_id", "token", "quota"}`` (the token is shown once)."""
        body: dict[str, Any] = {"name": name}
        if quota is not None:
            body["quota"] = quota
        return self._request("POST", "/v1/devices", json=body, idempotent=False).json()

    def put_update(self, device_id: str, round: int, data: bytes) -> dict[str, Any]:
        """Publish ``data`` as round ``round`` for a device (idempotent for identical data)."""
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise InputError(f"round must be a non-negative integer, got {round!r}")
        data = bytes(data)
        return self._request(
            "PUT", f"/v1/devices/{device_id}/updates/{round}", content=data,
            headers={"Content-SHA256": _sha256(data), "Content-Type": "application/octet-stream"},
        ).json()

    def list_uploads(self, device: str | None = None) -> list[dict[str, Any]]:
        """All uploads, or one device's."""
        params = {"device": device} if device is not None else None
        return self._request("GET", "/v1/uploads", params=params).json()

    def upload_info(self, upload_id: str, device: str | None = None) -> dict[str, Any]:
        """Status of any upload (admin); ``device`` disambiguates an id several devices used."""
        params = {"device": device} if device is not None else None
        return self._request("GET", f"/v1/uploads/{upload_id}", params=params).json()

    def upload_data(self, upload_id: str, device: str | None = None, dest: Path | str | None = None,
                    progress: bool = False) -> bytes:
        """The verified bytes of a complete upload (admin)."""
        info = self.upload_info(upload_id, device)
        if not info.get("complete"):
            raise InputError(f"upload {upload_id} is not complete ({info.get('offset')} of {info.get('size')} bytes)")
        suffix = f"?device={info['device_id']}"
        return self._download(f"/v1/uploads/{upload_id}/data{suffix}", int(info["size"]), str(info["sha256"]),
                              dest, progress, f"upload {upload_id}")

    # -- downloads -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _part_file(self, dest: Path | str | None) -> Iterator[tuple[Path, Path | None]]:
        """``(part_path, final_path)``: ``dest.part`` next to ``dest``, or a temporary file."""
        if dest is not None:
            final = Path(dest)
            yield final.with_name(final.name + ".part"), final
            return
        with tempfile.TemporaryDirectory(prefix="tokensieve-pull-") as tmp:
            yield Path(tmp) / "download.part", None

    def _download(self, path: str, size: int, sha256: str, dest: Path | str | None, progress: bool,
                  desc: str) -> bytes:
        """Fetch ``path`` (``size`` bytes, digest ``sha256``) resumably; return verified bytes."""
        with self._part_file(dest) as (part, final):
            fresh_start = not part.exists()
            with open(part, "ab") as fh, _progress(size, progress, desc) as bar:
                have = fh.tell()
                if have > size:
                    fh.truncate(0)
                    have = 0
                bar.update(have)
                have = self._fetch_into(fh, path, size, sha256, have, bar)
                fh.flush()
                os.fsync(fh.fileno())
            digest = hashlib.sha256(part.read_bytes()).hexdigest() if have == size else None
            if digest != sha256:
                part.unlink(missing_ok=True)
                if not fresh_start:  # a stale .part from an earlier call: start over once
                    return self._download(path, size, sha256, dest, progress, desc)
                raise CloudError(f"downloaded {desc} failed verification: SHA-256 {digest}, expected {sha256}")
            data = part.read_bytes()
            if final is not None:
                os.replace(part, final)
            return data

    def _fetch_into(self, fh: BinaryIO, path: str, size: int, sha256: str, have: int, bar: Any) -> int:
        """Append the bytes from ``have`` on to ``fh``, resuming with Range; returns the count."""
        failures = 0
        while have < size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with self._http.stream("GET", path, headers=headers) as resp:
                    if resp.status_code == 416:  # our partial file does not fit: start over
                        fh.truncate(0)
                        have = 0
                        bar.reset(total=size)
                        raise _Retryable("range not satisfiable")
                    if not resp.is_success:
                        resp.read()
                        self._check_or_retry(resp)
                    etag = resp.headers.get("etag", "").strip().removeprefix("W/").strip('"')
                    if etag and etag != sha256:
                        raise CloudError(f"{path} changed on the server (ETag {etag}, expected {sha256})")
                    if resp.status_code == 206:
                        match = _CONTENT_RANGE.fullmatch(resp.headers.get("content-range", ""))
                        if match is None or int(match.group(1)) != have:
                            raise CloudError(f"{path}: server sent an unexpected Content-Range")
                    else:  # a full answer: start over
                        fh.truncate(0)
                        fh.seek(0)
                        have = 0
                        bar.reset(total=size)
                    for block in resp.iter_bytes():
                        if have + len(block) > size:
                            raise CloudError(f"{path}: server sent more than the {size} bytes announced")
                        fh.write(block)
                        have += len(block)
                        bar.update(len(block))
                    if have < size:
                        raise _Retryable(f"connection ended after {have} of {size} bytes")
            except (httpx.TransportError, _Retryable) as exc:
                fh.flush()
                failures = self._failed(failures, f"download of {path}", exc)
        return have
