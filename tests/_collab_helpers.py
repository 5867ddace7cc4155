"""Helpers for tests/test_collab_service.py: a real service process and failure-injecting transports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx

START_TIMEOUT = 30.0


class ServerProcess:
    """``python -m tokensieve.collab.service.server`` on 127.0.0.1 in a subprocess.

    ``start()`` waits (bounded) for the port file the server writes once it listens. Its
    stdout/stderr go to ``log`` so tests can check that no token was ever logged.
    """

    def __init__(self, root: Path, admin_token: str, workdir: Path, *, limits: dict[str, int] | None = None) -> None:
        self.root = root
        self.admin_token = admin_token
        self.workdir = workdir
        self.limits = limits or {}
        self.token_file = workdir / "admin.token"
        self.token_file.write_text(admin_token + "\n")
        os.chmod(self.token_file, 0o600)
        self.log = workdir / "server.log"
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> None:
        """Start (or restart on ``port``; 0 picks a new one) and wait until it listens."""
        assert self.proc is None, "already running"
        self._starts += 1
        port_file = self.workdir / f"port.{self._starts}"
        cmd = [sys.executable, "-m", "tokensieve.collab.service.server", "--root", str(self.root),
               "--port", str(port), "--admin-token-file", str(self.token_file), "--port-file", str(port_file),
               "--log-level", "info"]
        for key, value in self.limits.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = dict(os.environ)
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not start within {START_TIMEOUT} s:\n{self.log.read_text()}")
            time.sleep(0.02)
        self.port = int(port_file.read_text().strip())

    def kill(self) -> None:
        """SIGKILL, no chance to clean up."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL if it does not exit within 10 s."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class _CutStream(httpx.SyncByteStream):
    """Yields at most ``limit`` bytes of ``inner``, then fails like a dropped connection."""

    def __init__(self, inner: httpx.SyncByteStream, limit: int, on_cut: Callable[[], None]) -> None:
        self._inner = inner
        self._limit = limit
        self._on_cut = on_cut

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for block in self._inner:
            if sent + len(block) >= self._limit:
                yield block[: self._limit - sent]
                self._on_cut()
                raise httpx.RemoteProtocolError("peer closed connection (injected)")
            sent += len(block)
            yield block

    def close(self) -> None:
        self._inner.close()


class FaultyTransport(httpx.BaseTransport):
    """Wraps the real transport and injects failures.

    * ``cut_downloads``: for that many GETs whose path starts with ``cut_prefix``, deliver only
      ``cut_after`` bytes of the body and then drop the connection;
    * ``lose_put_responses``: for that many chunk PUTs, forward the request (the server stores
      the chunk) and then raise as if the answer was lost;
    * ``put_delay``: sleep that long before each chunk PUT (to slow an upload down).
    """

    def __init__(self, *, cut_prefix: str = "/v1/updates/", cut_after: int = 0, cut_downloads: int = 0,
                 lose_put_responses: int = 0, put_delay: float = 0.0) -> None:
        self._inner = httpx.HTTPTransport()
        self.cut_prefix = cut_prefix
        self.cut_after = cut_after
        self.cut_downloads = cut_downloads
        self.lose_put_responses = lose_put_responses
        self.cuts = 0
        self.lost_puts = 0
        self.put_delay = put_delay
        self.errors = 0  # real transport errors seen (e.g. the server was killed)
        self.range_headers: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        is_download = request.method == "GET" and path.startswith(self.cut_prefix) and path[len(self.cut_prefix):][:1].isdigit()
        if is_download:
            self.range_headers.append(request.headers.get("range"))
        if request.method == "PUT" and self.put_delay:
            time.sleep(self.put_delay)
        try:
            response = self._inner.handle_request(request)
        except httpx.TransportError:
            self.errors += 1
            raise
        if request.method == "PUT" and path.startswith("/v1/uploads/") and self.lost_puts < self.lose_put_responses:
            response.read()
            response.close()
            self.lost_puts += 1
            raise httpx.ReadError("response lost (injected)", request=request)
        if is_download and self.cuts < self.cut_downloads and response.status_code in (200, 206):
            def on_cut() -> None:
                self.cuts += 1
            assert isinstance(response.stream, httpx.SyncByteStream)
            return httpx.Response(response.status_code, headers=response.headers,
                                  stream=_CutStream(response.stream, self.cut_after, on_cut),
                                  request=request, extensions=response.extensions)
        return response

    def close(self) -> None:
        self._inner.close()
