"""The cloud side of the collaboration: a small HTTP service and its client.

Devices upload opaque "uplink" payloads with a JSON manifest (resumable, chunked, SHA-256
checked) and pull the opaque "updates" published for them (resumable with ``Range``, SHA-256
checked); an administrator registers devices, publishes updates and reads uploads.

* :mod:`.store`  — durable state (SQLite + content-addressed blobs, fsync before acknowledging);
* :mod:`.app`    — :func:`create_app`, the FastAPI application;
* :mod:`.client` — :class:`CloudClient`, the httpx client with bounded retries;
* :mod:`.server` — :func:`serve` and ``python -m tokensieve.collab.service.server``.

The submodules are imported lazily so that using the client does not import the server stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CloudClient", "CloudError", "Store", "create_app", "serve"]

_EXPORTS = {
    "CloudClient": "client",
    "CloudError": "client",
    "Store": "store",
    "create_app": "app",
    "serve": "server",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
