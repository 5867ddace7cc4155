"""A collaboration service on loopback, in its own process, for demos and tests.

>>> with LocalService(root) as svc:            # doctest: +SKIP
...     admin = svc.admin_client()
...     device = admin.create_device("camera-1")

The server is the real one (``python -m tokensieve.collab.service.server``: uvicorn, SQLite,
bearer tokens); only the admin token is made up here (random, in a 0600 file under ``root``).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ...errors import TokensieveError

__all__ = ["LocalService"]


class LocalService:
    """Start the service on ``127.0.0.1`` (a free port) with its state under ``root``; stop it on exit."""

    def __init__(self, root: str | Path, *, start_timeout: float = 60.0, **limits: int) -> None:
        unknown = set(limits) - {"max_body", "max_chunk", "device_quota"}
        if unknown:
            raise TokensieveError(f"unknown limits {sorted(unknown)}; accepted: max_body, max_chunk, device_quota")
        self.limits = limits
        self.root = Path(root)
        self.start_timeout = start_timeout
        self.admin_token = secrets.token_urlsafe(24)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.log = self.root / "server.log"

    @property
    def url(self) -> str:
        if self.port is None:
            raise TokensieveError("the local service is not running")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalService:
        self.root.mkdir(parents=True, exist_ok=True)
        token_file = self.root / "admin.token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.admin_token + "\n")
        port_file = self.root / "port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "tokensieve.collab.service.server", "--root", str(self.root / "state"),
               "--port", "0", "--admin-token-file", str(token_file), "--port-file", str(port_file),
               "--log-level", "warning"]
        for key, value in self.limits.items():
            cmd += [f"--{key.replace('_', '-')}", str(int(value))]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        try:
            while not port_file.exists():
                if self.proc.poll() is not None:
                    raise TokensieveError(f"the collaboration service exited with status {self.proc.returncode}: "
                                          f"{self._last_log_line()}")
                if time.monotonic() > deadline:
                    raise TokensieveError(f"the collaboration service did not start within {self.start_timeout:g} s: "
                                          f"{self._last_log_line()}")
                time.sleep(0.02)
        except BaseException:
            self.stop()  # never leave a server behind (also on Ctrl-C while waiting)
            raise
        self.port = int(port_file.read_text().strip())
        return self

    def _last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else "(no output)"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def admin_client(self, **kwargs: Any) -> Any:
        from .client import CloudClient

        return CloudClient(self.url, self.admin_token, **kwargs)

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
