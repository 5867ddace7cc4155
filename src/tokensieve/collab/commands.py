"""``tokensieve cloud …`` and ``tokensieve device …``: the service and its client on the command line.

    tokensieve cloud serve --root DIR --admin-token-file F [--host 127.0.0.1] [--port 8470] [--port-file P]
    tokensieve cloud add-device --url URL --admin-token-file F --name NAME [--token-out FILE]
    tokensieve cloud publish --url URL --admin-token-file F --device ID --round N UPDATE_FILE
    tokensieve cloud uploads --url URL --admin-token-file F [--device ID]
    tokensieve device status --url URL --token-file F
    tokensieve device upload --url URL --token-file F --payload FILE --manifest FILE.json [--upload-id ID]
    tokensieve device pull --url URL --token-file F [--round latest] --out FILE

Tokens are read from files (never from the command line, where other users could see them).
The server and client packages are imported only when a command runs, so the rest of the
``tokensieve`` command works without the ``collab`` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .._argtypes import non_negative_int, positive_int
from ..errors import InputError
from .service.options import add_arguments as add_serve_arguments
from .service.options import read_token_file


def _client(args: argparse.Namespace, token_file: Path) -> Any:
    return _service("client").CloudClient(args.url, read_token_file(token_file, "token", 1), timeout=args.timeout)


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# --- cloud ----------------------------------------------------------------------------------


def _service(module: str) -> Any:
    """``tokensieve.collab.service.<module>``, or a clear error when the collab extra is missing."""
    import importlib

    try:
        return importlib.import_module(f"{__package__}.service.{module}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("fastapi", "starlette", "uvicorn", "httpx"):
            raise InputError(f"the cloud-device commands need the collab extra ({exc.name} is not installed): "
                             "pip install 'tokensieve[collab]'") from None
        raise


def _client_parser(sub: Any, name: str, helptext: str, token_option: str) -> argparse.ArgumentParser:
    """A sub-command that talks to the service: its URL, the file holding the caller's token, a timeout."""
    p = sub.add_parser(name, help=helptext)
    p.add_argument("--url", required=True, help="service URL, e.g. http://127.0.0.1:8470")
    p.add_argument(token_option, required=True, type=Path)
    p.add_argument("--timeout", type=float, default=30.0)
    return p


def add_cloud_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cloud_command", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="run the collaboration service (HTTP; HTTPS with --ssl-*)")
    add_serve_arguments(serve)
    for name, helptext in (("add-device", "register a device and print its token (shown once)"),
                           ("publish", "publish a weight update (a VTDW file) for a device"),
                           ("uploads", "list the uploads (all devices, or one)")):
        p = _client_parser(sub, name, helptext, "--admin-token-file")
        if name == "add-device":
            p.add_argument("--name", required=True)
            p.add_argument("--quota", type=positive_int)
            p.add_argument("--token-out", type=Path, help="write the device token to this file (mode 600)")
        elif name == "publish":
            p.add_argument("--device", required=True)
            p.add_argument("--round", required=True, type=non_negative_int)
            p.add_argument("update", type=Path, help="the update file (VTDW bytes)")
        else:
            p.add_argument("--device")


def run_cloud(args: argparse.Namespace) -> int:
    if args.cloud_command == "serve":
        return int(_service("server").run(args))
    with _client(args, args.admin_token_file) as admin:
        if args.cloud_command == "add-device":
            dev = admin.create_device(args.name, quota=args.quota)
            if args.token_out:
                args.token_out.touch(mode=0o600, exist_ok=True)
                args.token_out.write_text(dev["token"] + "\n")
                dev = {k: v for k, v in dev.items() if k != "token"} | {"token_file": str(args.token_out)}
            _print(dev)
        elif args.cloud_command == "publish":
            from .dwc import decode_update

            data = _read(args.update)
            upd = decode_update(data)  # publish only what a device can decode
            _print(admin.put_update(args.device, args.round, data) | {"records": len(upd.records)})
        else:
            _print(admin.list_uploads(device=args.device))
    return 0


# --- device ---------------------------------------------------------------------------------


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    for name, helptext in (("status", "the service's view of this device: uploads and updates"),
                           ("upload", "upload an uplink payload with its manifest (resumable)"),
                           ("pull", "download and verify a weight update (resumable)")):
        p = _client_parser(sub, name, helptext, "--token-file")
        if name == "upload":
            p.add_argument("--payload", required=True, type=Path, help="the payload bytes (e.g. safetensors)")
            p.add_argument("--manifest", required=True, type=Path, help="its JSON manifest")
            p.add_argument("--upload-id", help="resume this upload (default: derived from the content)")
        elif name == "pull":
            p.add_argument("--round", default="latest", help="a round number or 'latest'")
            p.add_argument("--out", required=True, type=Path, help="where to write the verified update")


def run_device(args: argparse.Namespace) -> int:
    with _client(args, args.token_file) as dev:
        if args.device_command == "status":
            _print({"health": dev.health(), "uploads": dev.uploads(), "updates": dev.updates()})
        elif args.device_command == "upload":
            data = _read(args.payload)
            try:
                manifest = json.loads(_read(args.manifest))
            except ValueError as exc:
                raise InputError(f"--manifest {args.manifest} is not JSON: {exc}") from None
            if not isinstance(manifest, dict):
                raise InputError(f"--manifest {args.manifest} must hold a JSON object")
            _print(dev.upload(data, manifest, upload_id=args.upload_id, progress=sys.stderr.isatty()))
        else:
            rnd: int | str = args.round
            if rnd != "latest":
                try:
                    rnd = int(rnd)
                except ValueError:
                    raise InputError(f"--round must be a number or 'latest', got {args.round!r}") from None
            data = dev.pull(rnd, dest=args.out, progress=sys.stderr.isatty())
            _print({"out": str(args.out), "bytes": len(data)})
    return 0


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


class _Plugin:
    """``add_arguments`` / ``run`` pairs in the form the ``tokensieve`` command loads."""

    def __init__(self, add: Any, run: Any) -> None:
        self.add_arguments, self.run = add, run


cloud = _Plugin(add_cloud_arguments, run_cloud)
device = _Plugin(add_device_arguments, run_device)
