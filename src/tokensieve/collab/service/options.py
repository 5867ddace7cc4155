"""The serving options, shared by ``tokensieve cloud serve`` and
``python -m tokensieve.collab.service.server`` (no server imports: the command line builds
without the ``collab`` extra)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..._argtypes import non_negative_int, positive_int
from ...errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serving options (shared with ``tokensieve cloud serve``)."""
    parser.add_argument("--root", required=True, type=Path, help="state directory (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=non_negative_int, default=8470, help="TCP port; 0 picks a free one")
    parser.add_argument("--port-file", type=Path, help="write the port here once listening")
    parser.add_argument("--admin-token-file", required=True, type=Path, help="file holding the admin token")
    parser.add_argument("--ssl-certfile", type=Path, help="TLS certificate (PEM)")
    parser.add_argument("--ssl-keyfile", type=Path, help="TLS private key (PEM)")
    parser.add_argument("--max-body", type=positive_int, help="largest upload or update in bytes (64 MiB)")
    parser.add_argument("--max-chunk", type=positive_int, help="largest upload chunk in bytes (8 MiB)")
    parser.add_argument("--device-quota", type=positive_int, help="default per-device quota in bytes (1 GiB)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def read_token_file(path: str | Path, what: str = "admin token", min_length: int = 16) -> str:
    """The token stored in ``path`` (surrounding whitespace stripped), at least ``min_length``
    characters; tokens are read from files, never from the command line."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the {what} file {str(path)!r}: {exc}") from None
    if not token:
        raise InputError(f"the {what} file {str(path)!r} is empty")
    if len(token) < min_length:
        raise InputError(f"the {what} in {str(path)!r} must be at least {min_length} characters")
    return token
