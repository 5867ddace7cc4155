"""Run the collaboration service with uvicorn.

    python -m tokensieve.collab.service.server --root DIR --admin-token-file FILE \\
        [--host 127.0.0.1] [--port 8470] [--port-file P] [--ssl-certfile C --ssl-keyfile K] \\
        [--max-body BYTES] [--max-chunk BYTES] [--device-quota BYTES]

With ``--port 0`` an ephemeral port is bound and, once the server accepts connections, written to
``--port-file`` (atomically), so a caller can wait for that file instead of racing the start-up.
The admin token is read from a file (never from the command line or the environment). All state
is durable (see :mod:`tokensieve.collab.service.store`), so SIGTERM and SIGKILL are both safe.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import uvicorn

from tokensieve.errors import InputError

from .app import create_app
from .options import add_arguments, read_token_file

__all__ = ["main", "read_token_file", "serve"]

_log = logging.getLogger("tokensieve.collab.service")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".port-", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: an ephemeral one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"cannot resolve host {host!r}: {exc}") from None
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc}") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """A uvicorn server that writes its port to a file once it accepts connections."""

    def __init__(self, config: uvicorn.Config, port: int, port_file: Path | None) -> None:
        super().__init__(config)
        self._port = port
        self._port_file = port_file

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            scheme = "https" if self.config.ssl is not None else "http"
            _log.info("tokensieve collab service listening on %s://%s:%d", scheme, self.config.host, self._port)
            if self._port_file is not None:
                _write_atomic(self._port_file, f"{self._port}\n")


def serve(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 8470,
    admin_token: str | None = None,
    ssl_certfile: str | Path | None = None,
    ssl_keyfile: str | Path | None = None,
    *,
    port_file: str | Path | None = None,
    log_level: str = "info",
    **limits: Any,
) -> None:
    """Serve the app for ``root`` on ``host:port`` until SIGINT/SIGTERM.

    ``limits`` are passed to :func:`~tokensieve.collab.service.app.create_app`
    (``max_body``, ``max_chunk``, ``device_quota``). Give both ``ssl_certfile`` and
    ``ssl_keyfile`` to serve HTTPS.
    """
    if admin_token is None:
        raise InputError("an admin token is required (pass admin_token, or --admin-token-file on the command line)")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise InputError("give both ssl_certfile and ssl_keyfile, or neither")
    unknown = set(limits) - {"max_body", "max_chunk", "device_quota"}
    if unknown:
        raise InputError(f"unknown limits {sorted(unknown)}; accepted: max_body, max_chunk, device_quota")
    app = create_app(Path(root), admin_token, **limits)
    sock = _bind(host, port)
    actual_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host=host,
        port=actual_port,
        log_level=log_level,
        access_log=True,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=5,
        ssl_certfile=None if ssl_certfile is None else str(ssl_certfile),
        ssl_keyfile=None if ssl_keyfile is None else str(ssl_keyfile),
    )
    server = _Server(config, actual_port, None if port_file is None else Path(port_file))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tokensieve.collab.service.server``."""
    parser = argparse.ArgumentParser(
        prog="python -m tokensieve.collab.service.server",
        description="Run the tokensieve cloud-device collaboration service.",
    )
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Serve with the parsed options of :func:`add_arguments` (raises :class:`InputError`)."""
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    limits = {k: v for k, v in (("max_body", args.max_body), ("max_chunk", args.max_chunk),
                                 ("device_quota", args.device_quota)) if v is not None}
    token = read_token_file(args.admin_token_file)
    serve(args.root, args.host, args.port, token, args.ssl_certfile, args.ssl_keyfile,
          port_file=args.port_file, log_level=args.log_level, **limits)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with one ``error: ...`` line for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
