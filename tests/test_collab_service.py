"""The collaboration service end to end: a real server process on 127.0.0.1 (ephemeral port),
driven over HTTP by :class:`CloudClient` and raw httpx requests.

Covers refusals (auth, isolation between devices, oversize, corrupt, wrong offset), durability
across ``kill -9``, resumed downloads, 50 concurrent devices, and a fuzz test of the input parsing.
Every test is bounded in time (an alarm per test plus timeouts on every wait).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _collab_helpers import FaultyTransport, ServerProcess
from tokensieve.collab.service.client import CloudClient, CloudError
from tokensieve.collab.service.server import main as server_main
from tokensieve.errors import InputError

pytestmark = pytest.mark.harness  # CI runs these on the newest transformers only (.ci/run)

KiB = 1024
LIMITS = {"max_chunk": 64 * KiB, "max_body": 1024 * KiB, "device_quota": 64 * 1024 * KiB}
TEST_TIME_LIMIT = 45  # seconds per test; the alarm turns a hang into a failure


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _time_limit() -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"test exceeded {TEST_TIME_LIMIT} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIME_LIMIT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared server process with small limits."""
    work = tmp_path_factory.mktemp("collab-shared")
    proc = ServerProcess(work / "root", secrets.token_urlsafe(32), work, limits=LIMITS)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def fresh_server(tmp_path: Path, **limits: int) -> ServerProcess:
    proc = ServerProcess(tmp_path / "root", secrets.token_urlsafe(32), tmp_path, limits={**LIMITS, **limits})
    proc.start()
    return proc


def admin_client(srv: ServerProcess, **kw: Any) -> CloudClient:
    return CloudClient(srv.url, srv.admin_token, timeout=10.0, **kw)


def new_device(srv: ServerProcess, name: str = "dev", **kw: Any) -> tuple[dict[str, Any], CloudClient]:
    with admin_client(srv) as admin:
        dev = admin.create_device(name, **kw)
    return dev, CloudClient(srv.url, dev["token"], timeout=10.0, backoff=0.01)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} if path.exists() else set()


# ---------------------------------------------------------------------------------------------
# Auth and isolation
# ---------------------------------------------------------------------------------------------


def test_refuses_missing_wrong_and_foreign_tokens(server: ServerProcess) -> None:
    dev_a, client_a = new_device(server, "a")
    dev_b, client_b = new_device(server, "b")
    data = os.urandom(100 * KiB)
    done = client_a.upload(data, {"kind": "uplink"}, upload_id="a-upload-0001")
    with admin_client(server) as admin:
        admin.put_update(dev_a["device_id"], 3, b"update-for-a")
    url = server.url

    with httpx.Client(base_url=url, timeout=10.0) as http:
        assert http.get("/v1/health").json() == {"ok": True}
        device_paths = [("GET", "/v1/uploads"), ("GET", "/v1/updates"), ("GET", "/v1/updates/latest"),
                        ("GET", "/v1/updates/3"), ("GET", "/v1/uploads/a-upload-0001"),
                        ("POST", "/v1/uploads/a-upload-0001/complete")]
        admin_paths = [("POST", "/v1/devices"), ("GET", "/v1/uploads/a-upload-0001/data"),
                       ("PUT", f"/v1/devices/{dev_a['device_id']}/updates/9")]
        for method, path in device_paths + admin_paths:
            for headers in ({}, bearer("not-a-token"), {"Authorization": "Basic Zm9vOmJhcg=="},
                            {"Authorization": "Bearer"}, bearer(server.admin_token + "x")):
                resp = http.request(method, path, headers=headers)
                assert resp.status_code == 401, (method, path, headers, resp.text)
                assert set(resp.json()) == {"error"}
                assert dev_a["device_id"] not in resp.text and done["sha256"] not in resp.text
        # a device token is not an admin token
        for method, path in admin_paths:
            resp = http.request(method, path, headers=bearer(dev_a["token"]))
            assert resp.status_code == 403, (method, path)
        # another device's objects look exactly like objects that do not exist
        nonexistent = http.get("/v1/uploads/zz-nothing-here", headers=bearer(dev_b["token"]))
        foreign = http.get("/v1/uploads/a-upload-0001", headers=bearer(dev_b["token"]))
        assert foreign.status_code == nonexistent.status_code == 404
        assert foreign.json() == nonexistent.json()
        for method, path, extra in (
            ("PUT", "/v1/uploads/a-upload-0001", {"Upload-Offset": "0"}),
            ("POST", "/v1/uploads/a-upload-0001/complete", {}),
            ("GET", "/v1/updates/3", {}),
        ):
            resp = http.request(method, path, headers={**bearer(dev_b["token"]), **extra}, content=b"x")
            assert resp.status_code == 404, (method, path, resp.text)
            assert dev_a["device_id"] not in resp.text and done["sha256"] not in resp.text
        assert http.get("/v1/uploads", headers=bearer(dev_b["token"])).json() == []
        assert http.get("/v1/updates", headers=bearer(dev_b["token"])).json() == []
        assert http.get("/v1/updates/latest", headers=bearer(dev_b["token"])).status_code == 404
        # the same upload id is independent per device
        same_id = client_b.upload(b"b's own bytes", {}, upload_id="a-upload-0001")
        assert same_id["sha256"] == sha(b"b's own bytes")
        assert client_a.upload_status("a-upload-0001")["sha256"] == done["sha256"]

    with pytest.raises(InputError, match="401"):
        CloudClient(url, "wrong-token", retries=0).updates()
    with pytest.raises(InputError, match="no update with round 3"):
        client_b.pull(3)
    assert client_a.pull(3) == b"update-for-a"

    # tokens are neither logged nor stored
    log = server.log_text()
    db = b"".join(p.read_bytes() for p in server.root.glob("state.sqlite3*"))
    for token in (dev_a["token"], dev_b["token"], server.admin_token):
        assert token not in log
        assert token.encode() not in db
    with sqlite3.connect(server.root / "state.sqlite3") as conn:
        stored = {row[0] for row in conn.execute("SELECT token_sha256 FROM devices")}
    assert sha(dev_a["token"].encode()) in stored


# ---------------------------------------------------------------------------------------------
# Oversize, corrupt, wrong offset
# ---------------------------------------------------------------------------------------------


def test_oversize_is_refused_and_nothing_stored(server: ServerProcess) -> None:
    dev, client = new_device(server, "big")
    blobs_before = files_under(server.root / "blobs")
    big = os.urandom(LIMITS["max_body"] + 1)
    with httpx.Client(base_url=server.url, timeout=10.0, headers=bearer(dev["token"])) as http:
        resp = http.post("/v1/uploads", json={"upload_id": "too-big-0001", "size": len(big), "sha256": sha(big),
                                              "manifest": {}})
        assert resp.status_code == 413 and "error" in resp.json()
        assert http.get("/v1/uploads").json() == []

        data = os.urandom(200 * KiB)
        assert http.post("/v1/uploads", json={"upload_id": "chunky-0001", "size": len(data), "sha256": sha(data),
                                              "manifest": {}}).status_code == 201
        resp = http.put("/v1/uploads/chunky-0001", content=data[: LIMITS["max_chunk"] + 1],
                        headers={"Upload-Offset": "0"})
        assert resp.status_code == 413 and resp.json()["max_chunk"] == LIMITS["max_chunk"]
        assert http.get("/v1/uploads/chunky-0001").json()["offset"] == 0
        # past the declared size
        small = b"12345678"
        assert http.post("/v1/uploads", json={"upload_id": "small-0001", "size": 8, "sha256": sha(small),
                                              "manifest": {}}).status_code == 201
        resp = http.put("/v1/uploads/small-0001", content=small + b"9", headers={"Upload-Offset": "0"})
        assert resp.status_code == 413
        assert http.get("/v1/uploads/small-0001").json()["offset"] == 0
    assert (server.root / "partial" / dev["device_id"] / "chunky-0001").stat().st_size == 0

    with pytest.raises(InputError, match="413"):
        client.upload(big, {})
    with admin_client(server) as admin:
        with pytest.raises(InputError, match="413"):
            admin.put_update(dev["device_id"], 1, big)
    with httpx.Client(base_url=server.url, timeout=10.0, headers=bearer(server.admin_token)) as http:
        resp = http.put(f"/v1/devices/{dev['device_id']}/updates/2", content=big,
                        headers={"Content-SHA256": sha(big), "Transfer-Encoding": "chunked"})
        assert resp.status_code == 413
    assert client.updates() == []
    assert files_under(server.root / "blobs") == blobs_before

    # over quota
    dev_q, client_q = new_device(server, "tiny-quota", quota=100 * KiB)
    client_q.upload(os.urandom(60 * KiB), {})
    with pytest.raises(InputError, match="507"):
        client_q.upload(os.urandom(60 * KiB), {})
    assert len(client_q.uploads()) == 1


def test_corrupt_body_is_rejected_and_discarded(server: ServerProcess) -> None:
    dev, client = new_device(server, "corrupt")
    data = os.urandom(150 * KiB)
    bad = bytearray(data)
    bad[777] ^= 0xFF
    blobs_before = files_under(server.root / "blobs")
    client.begin_upload("corrupt-0001", len(data), sha(data), {"n": 1})
    offset = 0
    while offset < len(bad):
        offset = client.send_chunk("corrupt-0001", offset, bytes(bad[offset:offset + 64 * KiB]))
    with httpx.Client(base_url=server.url, timeout=10.0, headers=bearer(dev["token"])) as http:
        resp = http.post("/v1/uploads/corrupt-0001/complete")
        assert resp.status_code == 422 and "error" in resp.json()
        assert http.get("/v1/uploads/corrupt-0001").status_code == 404
    assert not (server.root / "partial" / dev["device_id"] / "corrupt-0001").exists()
    assert files_under(server.root / "blobs") == blobs_before
    assert client.uploads() == []
    # the same id can then be uploaded correctly
    assert client.upload(data, {"n": 1}, upload_id="corrupt-0001")["sha256"] == sha(data)


def test_update_with_wrong_hash_is_rejected(server: ServerProcess) -> None:
    dev, client = new_device(server, "upd")
    blobs_before = files_under(server.root / "blobs")
    payload = os.urandom(10 * KiB)
    with httpx.Client(base_url=server.url, timeout=10.0, headers=bearer(server.admin_token)) as http:
        path = f"/v1/devices/{dev['device_id']}/updates/1"
        resp = http.put(path, content=payload, headers={"Content-SHA256": sha(payload + b"!")})
        assert resp.status_code == 422
        assert files_under(server.root / "blobs") == blobs_before
        assert http.put(path, content=payload, headers={"Content-SHA256": "nothex"}).status_code == 400
        assert http.put(path, content=payload, headers={"Content-SHA256": sha(payload)}).status_code == 201
        assert http.put(path, content=payload, headers={"Content-SHA256": sha(payload)}).status_code == 200
        other = http.put(path, content=b"other", headers={"Content-SHA256": sha(b"other")})
        assert other.status_code == 409
        assert http.put("/v1/devices/dev_000000000000000000000000/updates/1", content=b"x",
                        headers={"Content-SHA256": sha(b"x")}).status_code == 404
    assert [u["round"] for u in client.updates()] == [1]
    assert client.pull() == payload


def test_wrong_offset_conflicts_and_client_resyncs(server: ServerProcess) -> None:
    dev, client = new_device(server, "offsets")
    data = os.urandom(300 * KiB)
    client.begin_upload("offsets-0001", len(data), sha(data), {})
    assert client.send_chunk("offsets-0001", 0, data[:50 * KiB]) == 50 * KiB
    with httpx.Client(base_url=server.url, timeout=10.0, headers=bearer(dev["token"])) as http:
        for wrong in (0, 5, 50 * KiB + 1, 10**12):
            resp = http.put("/v1/uploads/offsets-0001", content=b"zzzz", headers={"Upload-Offset": str(wrong)})
            assert resp.status_code == 409
            assert resp.json()["offset"] == 50 * KiB
        resp = http.post("/v1/uploads/offsets-0001/complete")
        assert resp.status_code == 409 and resp.json()["offset"] == 50 * KiB
        # idempotent begin reports the offset; a different size or hash conflicts
        again = http.post("/v1/uploads", json={"upload_id": "offsets-0001", "size": len(data), "sha256": sha(data),
                                               "manifest": {}})
        assert again.status_code == 200 and again.json()["offset"] == 50 * KiB
        clash = http.post("/v1/uploads", json={"upload_id": "offsets-0001", "size": len(data) - 1,
                                               "sha256": sha(data), "manifest": {}})
        assert clash.status_code == 409
    assert client.upload_status("offsets-0001")["offset"] == 50 * KiB
    # the client resumes from the server's offset (its chunks of 100 KiB do not line up with 50 KiB)
    result = client.upload(data, {}, upload_id="offsets-0001", chunk_size=100 * KiB)
    assert result == {"upload_id": "offsets-0001", "sha256": sha(data), "size": len(data), "complete": True}
    assert client.upload(data, {}, upload_id="offsets-0001") == result  # completing twice is fine
    with admin_client(server) as admin:
        assert admin.upload_data("offsets-0001", device=dev["device_id"]) == data

    # responses lost after the server stored the chunk: the client asks for the offset and goes on
    faulty = FaultyTransport(lose_put_responses=3)
    lossy = CloudClient(server.url, dev["token"], timeout=10.0, backoff=0.01, transport=faulty)
    data2 = os.urandom(260 * KiB)
    out = lossy.upload(data2, {"lossy": True})
    assert faulty.lost_puts == 3 and out["sha256"] == sha(data2)
    with admin_client(server) as admin:
        assert admin.upload_data(out["upload_id"], device=dev["device_id"]) == data2


# ---------------------------------------------------------------------------------------------
# Durability
# ---------------------------------------------------------------------------------------------


def test_sigkill_mid_upload_then_resume(tmp_path: Path) -> None:
    srv = fresh_server(tmp_path)
    try:
        dev, client = new_device(srv, "killed")
        data = os.urandom(600 * KiB)
        client.begin_upload("durable-0001", len(data), sha(data), {"x": 1})
        acked = 0
        for _ in range(4):
            acked = client.send_chunk("durable-0001", acked, data[acked:acked + 64 * KiB])
        port = srv.port
        srv.kill()
        srv.start(port=port)  # same root, same port

        client = CloudClient(srv.url, dev["token"], timeout=10.0, backoff=0.01)
        assert client.upload_status("durable-0001")["offset"] == acked == 4 * 64 * KiB
        done = client.upload(data, {"x": 1}, upload_id="durable-0001")
        assert done["sha256"] == sha(data)
        # acknowledged completion survives another kill -9
        srv.kill()
        srv.start(port=port)
        with admin_client(srv) as admin:
            assert sha(admin.upload_data("durable-0001")) == sha(data)

        # a client that keeps uploading while the server is killed and restarted under it
        big = os.urandom(1000 * KiB)
        slow = FaultyTransport(put_delay=0.01)
        patient = CloudClient(srv.url, dev["token"], timeout=5.0, retries=300, backoff=0.05, transport=slow)
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["result"] = patient.upload(big, {"patient": True}, chunk_size=16 * KiB)
            except Exception as exc:  # reported below
                outcome["error"] = exc

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        upload_id = CloudClient.default_upload_id(big, {"patient": True})
        deadline = time.monotonic() + 15
        with admin_client(srv) as admin:
            while time.monotonic() < deadline:
                try:
                    if admin.upload_info(upload_id)["offset"] >= 200 * KiB:
                        break
                except InputError:
                    pass
                time.sleep(0.01)
        srv.kill()
        assert "result" not in outcome, "the upload finished before the server was killed"
        time.sleep(0.3)
        srv.start(port=port)
        worker.join(timeout=25)
        assert not worker.is_alive(), "upload did not finish"
        assert "error" not in outcome, outcome.get("error")
        assert outcome["result"]["sha256"] == sha(big)
        assert slow.errors >= 1  # the client really saw the server go away
        with admin_client(srv) as admin:
            assert admin.upload_data(upload_id) == big
        assert not any((srv.root / "partial" / dev["device_id"]).iterdir())
    finally:
        srv.stop()


def test_server_cli_refuses_bad_token_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert server_main(["--root", str(tmp_path / "r"), "--admin-token-file", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    short = tmp_path / "short"
    short.write_text("abc")
    assert server_main(["--root", str(tmp_path / "r"), "--admin-token-file", str(short)]) == 2


# ---------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------


def test_dropped_download_resumes_with_range(server: ServerProcess, tmp_path: Path) -> None:
    dev, _ = new_device(server, "puller")
    payload = os.urandom(500 * KiB)
    with admin_client(server) as admin:
        admin.put_update(dev["device_id"], 1, b"old round")
        admin.put_update(dev["device_id"], 7, payload)

    faulty = FaultyTransport(cut_after=100 * KiB, cut_downloads=3)
    client = CloudClient(server.url, dev["token"], timeout=10.0, backoff=0.01, transport=faulty)
    dest = tmp_path / "update.bin"
    got = client.pull("latest", dest=dest)
    assert got == payload and dest.read_bytes() == payload
    assert not (tmp_path / "update.bin.part").exists()
    assert faulty.cuts == 3
    assert faulty.range_headers == [None, f"bytes={100 * KiB}-", f"bytes={200 * KiB}-", f"bytes={300 * KiB}-"]
    assert client.pull(1) == b"old round"

    # Range semantics of the endpoint itself
    with httpx.Client(base_url=server.url, timeout=10.0, headers=bearer(dev["token"])) as http:
        full = http.get("/v1/updates/7")
        assert full.status_code == 200 and full.content == payload
        assert full.headers["etag"] == f'"{sha(payload)}"' and full.headers["accept-ranges"] == "bytes"
        part = http.get("/v1/updates/7", headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == payload[10:20]
        assert part.headers["content-range"] == f"bytes 10-19/{len(payload)}"
        tail = http.get("/v1/updates/7", headers={"Range": f"bytes={len(payload) - 5}-"})
        assert tail.status_code == 206 and tail.content == payload[-5:]
        assert http.get("/v1/updates/7", headers={"Range": "bytes=-3"}).content == payload[-3:]
        bad = http.get("/v1/updates/7", headers={"Range": f"bytes={len(payload)}-"})
        assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(payload)}"
        assert http.get("/v1/updates/x7").status_code == 404


def test_pull_never_returns_unverified_bytes(server: ServerProcess, tmp_path: Path) -> None:
    dev, client = new_device(server, "tampered")
    payload = os.urandom(40 * KiB) + secrets.token_bytes(16)
    with admin_client(server) as admin:
        admin.put_update(dev["device_id"], 1, payload)
    blob = server.root / "blobs" / sha(payload)
    tampered = bytearray(payload)
    tampered[5] ^= 1
    blob.write_bytes(bytes(tampered))  # disk corruption behind the server's back
    dest = tmp_path / "u.bin"
    with pytest.raises(CloudError, match="verification"):
        client.pull(1, dest=dest)
    assert not dest.exists() and not (tmp_path / "u.bin.part").exists()
    blob.write_bytes(payload)
    assert client.pull(1, dest=dest) == payload


# ---------------------------------------------------------------------------------------------
# Many devices at once
# ---------------------------------------------------------------------------------------------


def test_fifty_concurrent_devices_each_stored_exactly_once(tmp_path: Path) -> None:
    srv = fresh_server(tmp_path)
    try:
        n = 50
        rng = random.Random(1234)
        with admin_client(srv) as admin:
            devices = [admin.create_device(f"sim-{i}") for i in range(n)]
            updates = [rng.randbytes(rng.randint(1, 40 * KiB)) for _ in range(n)]
            for dev, blob in zip(devices, updates):
                admin.put_update(dev["device_id"], 1, blob)
        payloads = [rng.randbytes(rng.randint(1, 120 * KiB)) for _ in range(n)]
        results: list[Any] = [None] * n
        start = threading.Barrier(n, timeout=20)

        def device(i: int) -> None:
            try:
                with CloudClient(srv.url, devices[i]["token"], timeout=15.0, retries=10, backoff=0.05) as c:
                    start.wait()
                    up = c.upload(payloads[i], {"device": i}, chunk_size=32 * KiB)
                    pulled = c.pull()
                    results[i] = (up, pulled)
            except Exception as exc:  # reported below
                results[i] = exc

        threads = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        for t in threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "some devices did not finish"
        failures = [r for r in results if isinstance(r, Exception) or r is None]
        assert not failures, failures[:3]
        for i, (up, pulled) in enumerate(results):
            assert up["sha256"] == sha(payloads[i]) and up["size"] == len(payloads[i])
            assert pulled == updates[i]

        def check_all_stored() -> None:
            with admin_client(srv) as admin:
                listed = admin.list_uploads()
                assert len(listed) == n
                by_device = {u["device_id"]: u for u in listed}
                assert len(by_device) == n  # exactly one per device
                for i, dev in enumerate(devices):
                    info = by_device[dev["device_id"]]
                    assert info["complete"] and info["manifest"] == {"device": i}
                    assert info["sha256"] == sha(payloads[i])
                    assert sha(admin.upload_data(info["upload_id"], device=dev["device_id"])) == sha(payloads[i])
                    assert admin.list_uploads(device=dev["device_id"]) == [info]

        check_all_stored()
        port = srv.port
        srv.kill()
        srv.start(port=port)
        check_all_stored()
        log = srv.log_text()
        assert not any(dev["token"] in log for dev in devices)
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------
# Fuzzing the input parsing
# ---------------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_begin_body = st.one_of(
    _json,
    st.fixed_dictionaries(
        {},
        optional={
            "upload_id": st.one_of(_json, st.from_regex(r"[A-Za-z0-9_-]{0,70}", fullmatch=True)),
            "size": st.one_of(_json, st.integers(-5, 2 * LIMITS["max_body"])),
            "sha256": st.one_of(_json, st.from_regex(r"[0-9a-fA-F]{60,66}", fullmatch=True)),
            "manifest": _json,
        },
    ),
)
_header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(str.strip)
_path_id = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"),
                   min_size=1, max_size=70)


@pytest.fixture(scope="module")
def fuzz_device(server: ServerProcess) -> dict[str, Any]:
    dev, client = new_device(server, "fuzz")
    client.begin_upload("fuzz-target", 1000, sha(b"x" * 1000), {})
    return dev


@pytest.fixture(scope="module")
def fuzz_http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10.0) as http:
        yield http


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=_begin_body, raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_fuzz_begin_never_5xx(fuzz_http: httpx.Client, fuzz_device: dict[str, Any], body: Any,
                              raw: bytes | None) -> None:
    content = raw if raw is not None else json.dumps(body).encode()
    resp = fuzz_http.post("/v1/uploads", content=content,
                          headers={**bearer(fuzz_device["token"]), "Content-Type": "application/json"})
    assert resp.status_code < 500, resp.text
    assert resp.status_code in (200, 201) or (400 <= resp.status_code < 500 or resp.status_code == 507)
    assert "error" in resp.json() or resp.status_code in (200, 201)


@pytest.mark.parametrize("raw", [
    b'{"upload_id": "tricky-0001", "size": 1, "sha256": "' + b"a" * 64 + b'", "manifest": {"x": 1e400}}',
    b'{"upload_id": "tricky-0002", "size": 1e400, "sha256": "' + b"a" * 64 + b'", "manifest": {}}',
    b'{"upload_id": "tricky-0003", "size": NaN, "sha256": "' + b"a" * 64 + b'"}',
    b'{"upload_id": "tricky-0004", "size": true, "sha256": "' + b"a" * 64 + b'"}',
    b'{"upload_id": "tricky-0005\\n", "size": 1, "sha256": "' + b"a" * 64 + b'"}',
    b"[" * 100000, b"\xff\xfe", b"", b"null", b'{"upload_id": "\\ud800xxxxxxx", "size": 1}',
])
def test_tricky_begin_bodies_are_4xx(fuzz_http: httpx.Client, fuzz_device: dict[str, Any], raw: bytes) -> None:
    resp = fuzz_http.post("/v1/uploads", content=raw, headers=bearer(fuzz_device["token"]))
    assert 400 <= resp.status_code < 500, resp.text


def test_server_log_has_no_errors_or_tokens(server: ServerProcess) -> None:
    log = server.log_text()
    assert "Traceback" not in log and "internal error" not in log and '" 500 ' not in log
    assert server.admin_token not in log


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(upload_id=st.one_of(st.just("fuzz-target"), _path_id), offset=st.one_of(st.none(), _header_text,
       st.integers(-3, 2000).map(str)), body=st.binary(max_size=1200), auth=st.one_of(st.none(), _header_text))
def test_fuzz_chunk_never_5xx(fuzz_http: httpx.Client, fuzz_device: dict[str, Any], upload_id: str,
                              offset: str | None, body: bytes, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth is not None else bearer(fuzz_device["token"])
    if offset is not None:
        headers["Upload-Offset"] = offset
    resp = fuzz_http.put(f"/v1/uploads/{upload_id}", content=body, headers=headers)
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert "error" in resp.json()
