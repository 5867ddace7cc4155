"""Durable state of the collaboration service: SQLite metadata plus content-addressed blobs.

Layout under ``root``::

    state.sqlite3            devices, uploads and updates (WAL mode, synchronous=FULL)
    blobs/<sha256>           every stored payload, named by its SHA-256 hex digest
    blobs/.tmp-*             blob writes in flight (removed at start-up)
    partial/<device>/<id>    the bytes received so far of an upload that is not complete

Durability rules (everything the service acknowledged survives ``kill -9``):

* a blob is written to a temporary file in ``blobs/``, flushed and ``fsync``-ed, renamed into
  place with :func:`os.replace`, the directory is ``fsync``-ed, and only then is the row that
  refers to it committed;
* a chunk of an upload is written at the durable offset of ``partial/<device>/<id>`` (any
  unacknowledged tail beyond it is truncated first), the file is ``fsync``-ed and only then is the
  new offset committed; the service answers after the commit.

Upload ids are chosen by the client and are scoped per device: two devices may use the same id
without learning anything about each other. Tokens are never stored, only their SHA-256.

The store is thread safe: one SQLite connection guarded by a lock for metadata, and one lock per
upload serialising the file work of that upload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "BadInput",
    "BlobWriter",
    "Conflict",
    "Mismatch",
    "NotFound",
    "OverQuota",
    "Store",
    "StoreError",
    "TooLarge",
    "UpdateInfo",
    "UploadInfo",
    "is_sha256",
    "is_upload_id",
    "token_digest",
]

_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DEVICE_ID = re.compile(r"dev_[0-9a-f]{24}")
_READ_BLOCK = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    token_sha256  TEXT NOT NULL UNIQUE,
    created       REAL NOT NULL,
    quota         INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    device_id  TEXT NOT NULL REFERENCES devices(id),
    upload_id  TEXT NOT NULL,
    size       INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    manifest   TEXT NOT NULL,
    received   INTEGER NOT NULL DEFAULT 0,
    complete   INTEGER NOT NULL DEFAULT 0,
    created    REAL NOT NULL,
    completed  REAL,
    PRIMARY KEY (device_id, upload_id)
);
CREATE INDEX IF NOT EXISTS uploads_by_id ON uploads(upload_id);
CREATE TABLE IF NOT EXISTS updates (
    device_id  TEXT NOT NULL REFERENCES devices(id),
    round      INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    created    REAL NOT NULL,
    PRIMARY KEY (device_id, round)
);
"""


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class StoreError(Exception):
    """A request the store refuses; ``status`` is the HTTP status the service answers with and
    ``extra`` holds fields added to the JSON error body (e.g. the current ``offset``)."""

    status = 400

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class BadInput(StoreError):
    """Malformed input (400)."""

    status = 400


class NotFound(StoreError):
    """No such object visible to the caller (404)."""

    status = 404


class Conflict(StoreError):
    """The request contradicts the stored state, e.g. a wrong offset (409)."""

    status = 409


class TooLarge(StoreError):
    """More bytes than allowed (413)."""

    status = 413


class Mismatch(StoreError):
    """The received bytes do not match the declared size or SHA-256 (422)."""

    status = 422


class OverQuota(StoreError):
    """The device's storage quota would be exceeded (507)."""

    status = 507


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def is_upload_id(value: object) -> bool:
    """Whether ``value`` is a valid client-chosen upload id: 8–64 characters of ``[A-Za-z0-9_-]``."""
    return isinstance(value, str) and _UPLOAD_ID.fullmatch(value) is not None


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a lowercase SHA-256 hex digest (64 characters)."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def is_device_id(value: object) -> bool:
    """Whether ``value`` has the shape of a device id this store hands out."""
    return isinstance(value, str) and _DEVICE_ID.fullmatch(value) is not None


def token_digest(token: str) -> str:
    """SHA-256 hex digest of a bearer token (what the store keeps instead of the token)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _fsync_dir(path: Path) -> None:
    """``fsync`` a directory so that entries created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """Create ``path`` (mode 0700) and make its entry durable in its parent."""
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        _fsync_dir(path.parent)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _hash_file(path: Path) -> tuple[str, int]:
    """SHA-256 hex digest and size of the file at ``path``."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_READ_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UploadInfo:
    """One upload as the store knows it."""

    device_id: str
    upload_id: str
    size: int
    sha256: str
    manifest: dict[str, Any]
    offset: int
    complete: bool
    created: float
    completed: float | None

    def to_json(self) -> dict[str, Any]:
        """The JSON object the service returns for this upload."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class UpdateInfo:
    """One published update (a round of weight deltas for one device)."""

    device_id: str
    round: int
    size: int
    sha256: str
    created: float

    def to_json(self) -> dict[str, Any]:
        """The JSON object the service returns for this update (without the device id)."""
        return {"round": self.round, "size": self.size, "sha256": self.sha256, "created": self.created}


def _upload_from_row(row: sqlite3.Row) -> UploadInfo:
    return UploadInfo(
        device_id=row["device_id"],
        upload_id=row["upload_id"],
        size=int(row["size"]),
        sha256=row["sha256"],
        manifest=json.loads(row["manifest"]),
        offset=int(row["received"]),
        complete=bool(row["complete"]),
        created=float(row["created"]),
        completed=None if row["completed"] is None else float(row["completed"]),
    )


def _update_from_row(row: sqlite3.Row) -> UpdateInfo:
    return UpdateInfo(
        device_id=row["device_id"], round=int(row["round"]), size=int(row["size"]),
        sha256=row["sha256"], created=float(row["created"]),
    )


# ---------------------------------------------------------------------------------------------
# Blob writer
# ---------------------------------------------------------------------------------------------


class BlobWriter:
    """Streams bytes into a temporary file in ``blobs/`` and publishes it atomically under its
    SHA-256 (see :meth:`commit`). Not thread safe; one writer per request."""

    def __init__(self, blobs: Path, max_size: int) -> None:
        self._blobs = blobs
        self._max_size = max_size
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=blobs)
        self._fd: int | None = fd
        self._tmp = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append ``data``; raises :class:`TooLarge` past ``max_size`` (the writer is then aborted)."""
        if self._fd is None:
            raise RuntimeError("blob writer is closed")
        if self.size + len(data) > self._max_size:
            self.abort()
            raise TooLarge(f"body larger than the limit of {self._max_size} bytes", max_body=self._max_size)
        _pwrite_all(self._fd, data, self.size)
        self._hash.update(data)
        self.size += len(data)

    def commit(self, expected_sha256: str) -> tuple[str, int]:
        """Check the digest, make the bytes durable and rename them to ``blobs/<sha256>``.

        Returns ``(sha256, size)``. On a digest mismatch the temporary file is removed and
        :class:`Mismatch` raised, so nothing is stored.
        """
        if self._fd is None:
            raise RuntimeError("blob writer is closed")
        digest = self._hash.hexdigest()
        if not hmac.compare_digest(digest, expected_sha256):
            self.abort()
            raise Mismatch(f"SHA-256 of the body is {digest}, not the declared {expected_sha256}; nothing stored")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self._tmp, self._blobs / digest)
        _fsync_dir(self._blobs)
        return digest, self.size

    def abort(self) -> None:
        """Discard what was written (safe to call more than once)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


# ---------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------


class _KeyedLocks:
    """One lock per key, dropped again when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], list[Any]] = {}  # key -> [lock, users]

    @contextlib.contextmanager
    def hold(self, key: tuple[str, str]) -> Iterator[None]:
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]


class Store:
    """Devices, uploads and updates kept durably under ``root`` (see the module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.blobs = self.root / "blobs"
        self.partial = self.root / "partial"
        _makedirs_durable(self.blobs)
        _makedirs_durable(self.partial)
        self._db_lock = threading.Lock()
        self._upload_locks = _KeyedLocks()
        self._conn = sqlite3.connect(
            self.root / "state.sqlite3", check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)
        self._cleanup()

    # -- plumbing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection."""
        with self._db_lock:
            self._conn.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` … ``COMMIT``) under the metadata lock."""
        with self._db_lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._db_lock:
            return self._conn.execute(sql, params).fetchall()

    def _cleanup(self) -> None:
        """Remove blob writes cut short by a crash and partial files no incomplete upload owns."""
        for tmp in self.blobs.glob(".tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        live = {(r["device_id"], r["upload_id"])
                for r in self._query("SELECT device_id, upload_id FROM uploads WHERE complete = 0")}
        for device_dir in self.partial.iterdir():
            if not device_dir.is_dir():
                continue
            for part in device_dir.iterdir():
                if (device_dir.name, part.name) not in live:
                    with contextlib.suppress(FileNotFoundError):
                        part.unlink()

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this digest lives."""
        if not is_sha256(sha256):
            raise BadInput("not a SHA-256 hex digest")
        return self.blobs / sha256

    def blob_writer(self, max_size: int) -> BlobWriter:
        """A new :class:`BlobWriter` into ``blobs/`` accepting at most ``max_size`` bytes."""
        return BlobWriter(self.blobs, max_size)

    def _partial_path(self, device_id: str, upload_id: str) -> Path:
        return self.partial / device_id / upload_id

    # -- devices -------------------------------------------------------------------------------

    def create_device(self, name: str, quota: int) -> tuple[str, str]:
        """Register a device; returns ``(device_id, token)``. The token is not kept, only its hash."""
        device_id = "dev_" + secrets.token_hex(12)
        token = secrets.token_urlsafe(32)
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO devices (id, name, token_sha256, created, quota) VALUES (?, ?, ?, ?, ?)",
                (device_id, name, token_digest(token), time.time(), quota),
            )
        return device_id, token

    def device_for_token(self, token: str) -> str | None:
        """The id of the device whose token this is, or None."""
        digest = token_digest(token)
        rows = self._query("SELECT id, token_sha256 FROM devices WHERE token_sha256 = ?", (digest,))
        for row in rows:
            if hmac.compare_digest(row["token_sha256"], digest):
                return str(row["id"])
        return None

    def device_exists(self, device_id: str) -> bool:
        """Whether a device with this id is registered."""
        return is_device_id(device_id) and bool(self._query("SELECT 1 FROM devices WHERE id = ?", (device_id,)))

    def list_devices(self) -> list[dict[str, Any]]:
        """All devices (id, name, created, quota) — never tokens or their hashes."""
        rows = self._query("SELECT id, name, created, quota FROM devices ORDER BY created, id")
        return [{"device_id": r["id"], "name": r["name"], "created": r["created"], "quota": r["quota"]} for r in rows]

    # -- uploads -------------------------------------------------------------------------------

    def _upload_row(self, device_id: str, upload_id: str) -> sqlite3.Row:
        rows = self._query("SELECT * FROM uploads WHERE device_id = ? AND upload_id = ?", (device_id, upload_id))
        if not rows:
            raise NotFound("no such upload")
        return rows[0]

    def begin_upload(
        self, device_id: str, upload_id: str, size: int, sha256: str, manifest: dict[str, Any]
    ) -> tuple[UploadInfo, bool]:
        """Start an upload, or find the same one again.

        Returns ``(info, created)``. Beginning an upload that exists with the same size and
        digest returns it unchanged (``created`` False); with a different size or digest raises
        :class:`Conflict`. Raises :class:`OverQuota` when the declared sizes of the device's
        uploads would exceed its quota.
        """
        if not is_upload_id(upload_id):
            raise BadInput("upload_id must be 8-64 characters of A-Z a-z 0-9 _ -")
        if not is_sha256(sha256):
            raise BadInput("sha256 must be 64 lowercase hex digits")
        manifest_text = json.dumps(manifest, separators=(",", ":"), sort_keys=True, allow_nan=False)
        with self._upload_locks.hold((device_id, upload_id)):
            rows = self._query("SELECT * FROM uploads WHERE device_id = ? AND upload_id = ?", (device_id, upload_id))
            if rows:
                info = _upload_from_row(rows[0])
                if info.size != size or info.sha256 != sha256:
                    raise Conflict("upload_id already used with a different size or sha256", offset=info.offset)
                return info, False
            device_dir = self.partial / device_id
            _makedirs_durable(device_dir)
            part = device_dir / upload_id
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(device_dir)
            now = time.time()
            try:
                with self._tx() as conn:
                    quota_row = conn.execute("SELECT quota FROM devices WHERE id = ?", (device_id,)).fetchone()
                    if quota_row is None:
                        raise NotFound("no such device")
                    used = conn.execute(
                        "SELECT COALESCE(SUM(size), 0) FROM uploads WHERE device_id = ?", (device_id,)
                    ).fetchone()[0]
                    if used + size > quota_row["quota"]:
                        raise OverQuota(
                            f"over quota: {used} of {quota_row['quota']} bytes used, upload declares {size}",
                            used=used, quota=quota_row["quota"],
                        )
                    conn.execute(
                        "INSERT INTO uploads (device_id, upload_id, size, sha256, manifest, received, complete,"
                        " created) VALUES (?, ?, ?, ?, ?, 0, 0, ?)",
                        (device_id, upload_id, size, sha256, manifest_text, now),
                    )
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
                raise
            return _upload_from_row(self._upload_row(device_id, upload_id)), True

    def append_chunk(self, device_id: str, upload_id: str, offset: int, data: bytes) -> int:
        """Append ``data`` at ``offset``, which must equal the durable received offset.

        The bytes are ``fsync``-ed and the new offset committed before this returns it. Raises
        :class:`Conflict` (with the current ``offset``) for a wrong offset or a complete upload,
        :class:`TooLarge` when the chunk would go past the declared size.
        """
        with self._upload_locks.hold((device_id, upload_id)):
            info = _upload_from_row(self._upload_row(device_id, upload_id))
            if info.complete:
                raise Conflict("upload is already complete", offset=info.size, complete=True)
            part = self._partial_path(device_id, upload_id)
            try:
                fd = os.open(part, os.O_WRONLY)
            except FileNotFoundError:
                self._set_received(device_id, upload_id, 0)
                raise Conflict("received data was lost; resend from offset 0", offset=0) from None
            try:
                on_disk = os.fstat(fd).st_size
                current = info.offset
                if on_disk < current:  # cannot happen with fsync before commit; heal anyway
                    current = on_disk
                    self._set_received(device_id, upload_id, current)
                if offset != current:
                    raise Conflict(f"offset {offset} does not match the received offset {current}", offset=current)
                if offset + len(data) > info.size:
                    raise TooLarge(
                        f"chunk of {len(data)} bytes at offset {offset} goes past the declared size {info.size}",
                        offset=current,
                    )
                if not data:
                    return current
                os.ftruncate(fd, offset)  # drop any tail that was written but never acknowledged
                _pwrite_all(fd, data, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
            new = offset + len(data)
            self._set_received(device_id, upload_id, new)
            return new

    def _set_received(self, device_id: str, upload_id: str, received: int) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE uploads SET received = ? WHERE device_id = ? AND upload_id = ? AND complete = 0",
                (received, device_id, upload_id),
            )

    def complete_upload(self, device_id: str, upload_id: str) -> UploadInfo:
        """Verify the received bytes and publish them as ``blobs/<sha256>``.

        Idempotent: completing a complete upload returns it. Raises :class:`Conflict` (with the
        ``offset``) if not all bytes arrived yet, and :class:`Mismatch` if the bytes do not hash to
        the declared digest — then the partial data and the upload are discarded, nothing is kept.
        """
        with self._upload_locks.hold((device_id, upload_id)):
            info = _upload_from_row(self._upload_row(device_id, upload_id))
            if info.complete:
                return info
            if info.offset != info.size:
                raise Conflict(f"upload incomplete: {info.offset} of {info.size} bytes received", offset=info.offset)
            part = self._partial_path(device_id, upload_id)
            dest = self.blobs / info.sha256
            if not part.exists():
                if not dest.exists():  # the received bytes vanished: start over
                    self._set_received(device_id, upload_id, 0)
                    raise Conflict("received data was lost; resend from offset 0", offset=0)
                # a crash hit between publishing the blob and committing the row: finish the job
            else:
                digest, size = _hash_file(part)
                if size != info.size or not hmac.compare_digest(digest, info.sha256):
                    self._discard(device_id, upload_id, part)
                    raise Mismatch(
                        f"received {size} bytes with SHA-256 {digest}, declared {info.size} bytes with "
                        f"SHA-256 {info.sha256}; the upload was discarded"
                    )
                if dest.exists():  # identical content stored before (content addressed)
                    part.unlink()
                else:
                    os.replace(part, dest)
                    _fsync_dir(self.blobs)
                _fsync_dir(part.parent)
            with self._tx() as conn:
                conn.execute(
                    "UPDATE uploads SET complete = 1, completed = ? WHERE device_id = ? AND upload_id = ?",
                    (time.time(), device_id, upload_id),
                )
            return _upload_from_row(self._upload_row(device_id, upload_id))

    def _discard(self, device_id: str, upload_id: str, part: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        _fsync_dir(part.parent)
        with self._tx() as conn:
            conn.execute("DELETE FROM uploads WHERE device_id = ? AND upload_id = ?", (device_id, upload_id))

    def get_upload(self, upload_id: str, device_id: str | None = None) -> UploadInfo:
        """One upload. With ``device_id`` None (admin), the id must be unique across devices,
        else :class:`Conflict` asks for the device."""
        if not is_upload_id(upload_id):
            raise NotFound("no such upload")
        if device_id is not None:
            return _upload_from_row(self._upload_row(device_id, upload_id))
        rows = self._query("SELECT * FROM uploads WHERE upload_id = ?", (upload_id,))
        if not rows:
            raise NotFound("no such upload")
        if len(rows) > 1:
            raise Conflict("several devices used this upload_id; name one with ?device=",
                           devices=sorted(r["device_id"] for r in rows))
        return _upload_from_row(rows[0])

    def list_uploads(self, device_id: str | None = None) -> list[UploadInfo]:
        """Uploads of one device, or of all devices when ``device_id`` is None."""
        if device_id is None:
            rows = self._query("SELECT * FROM uploads ORDER BY created, device_id, upload_id")
        else:
            rows = self._query("SELECT * FROM uploads WHERE device_id = ? ORDER BY created, upload_id", (device_id,))
        return [_upload_from_row(r) for r in rows]

    # -- updates -------------------------------------------------------------------------------

    def add_update(self, device_id: str, round_: int, sha256: str, size: int) -> tuple[UpdateInfo, bool]:
        """Record an update whose blob is already stored. Returns ``(info, created)``; the same
        round with the same digest again gives ``created`` False, a different digest
        :class:`Conflict`."""
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM devices WHERE id = ?", (device_id,)).fetchone() is None:
                raise NotFound("no such device")
            row = conn.execute(
                "SELECT * FROM updates WHERE device_id = ? AND round = ?", (device_id, round_)
            ).fetchone()
            if row is not None:
                info = _update_from_row(row)
                if info.sha256 != sha256:
                    raise Conflict(f"round {round_} already holds a different update", sha256=info.sha256)
                return info, False
            conn.execute(
                "INSERT INTO updates (device_id, round, size, sha256, created) VALUES (?, ?, ?, ?, ?)",
                (device_id, round_, size, sha256, time.time()),
            )
        return self.get_update(device_id, round_), True

    def get_update(self, device_id: str, round_: int) -> UpdateInfo:
        """One update of one device."""
        rows = self._query("SELECT * FROM updates WHERE device_id = ? AND round = ?", (device_id, round_))
        if not rows:
            raise NotFound("no such update")
        return _update_from_row(rows[0])

    def find_update(self, device_id: str, round_: int) -> UpdateInfo | None:
        """One update of one device, or None."""
        rows = self._query("SELECT * FROM updates WHERE device_id = ? AND round = ?", (device_id, round_))
        return _update_from_row(rows[0]) if rows else None

    def list_updates(self, device_id: str) -> list[UpdateInfo]:
        """A device's updates in round order."""
        rows = self._query("SELECT * FROM updates WHERE device_id = ? ORDER BY round", (device_id,))
        return [_update_from_row(r) for r in rows]

    def latest_update(self, device_id: str) -> UpdateInfo:
        """A device's update with the highest round."""
        rows = self._query("SELECT * FROM updates WHERE device_id = ? ORDER BY round DESC LIMIT 1", (device_id,))
        if not rows:
            raise NotFound("no updates for this device")
        return _update_from_row(rows[0])
