"""Both links end to end through the command line and a real service on loopback:
UTS picks a device's uncertain samples and tokens → uplink payload → ``tokensieve device upload``
→ the cloud reads it back → a DWC update → ``tokensieve cloud publish`` → ``tokensieve device
pull`` → applied on the device, whose state then hashes exactly like the cloud's mirror."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tokensieve.cli import main
from tokensieve.collab.dwc import apply_update, encode_update, state_hash
from tokensieve.collab.service.client import CloudClient
from tokensieve.collab.uplink import Uplink, decode_uplink, encode_uplink
from tokensieve.methods.uts import UTS


def _json(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_uplink_and_downlink_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    admin_file = tmp_path / "admin.token"
    admin_file.write_text(secrets.token_urlsafe(32))
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [sys.executable, "-m", "tokensieve", "cloud", "serve", "--root", str(tmp_path / "root"), "--port", "0",
         "--port-file", str(port_file), "--admin-token-file", str(admin_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert server.poll() is None and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        dev = _json(capsys, ["cloud", "add-device", "--url", url, "--admin-token-file", str(admin_file),
                             "--name", "camera-1", "--token-out", str(tmp_path / "dev.token")])
        assert "token" not in dev and (tmp_path / "dev.token").stat().st_mode & 0o077 == 0

        # device: two of four answers were unsure; UTS keeps their least uncertain tokens
        g = torch.Generator().manual_seed(0)
        logits = [torch.randn(4, 50, generator=g) * torch.tensor([[9.0], [0.1], [9.0], [0.1]]) for _ in range(3)]
        uts = UTS(mask_ratio=0.5)
        send, conf = uts.samples_to_uplink(logits)
        assert send.tolist() == [False, True, False, True]
        feats = torch.randn(4, 32, 16, generator=g)[send]
        keep = uts.tokens_to_keep(feats)
        blob, manifest = encode_uplink(Uplink("camera-1", 1, ["s1", "s3"], feats, keep, answers=["a", "b"],
                                              confidences=conf[send].tolist()))
        (tmp_path / "up.safetensors").write_bytes(blob)
        (tmp_path / "up.json").write_text(json.dumps(manifest))
        done = _json(capsys, ["device", "upload", "--url", url, "--token-file", str(tmp_path / "dev.token"),
                              "--payload", str(tmp_path / "up.safetensors"), "--manifest", str(tmp_path / "up.json")])
        assert done["size"] == len(blob)

        # cloud: read the uplink back, verified
        with CloudClient(url, admin_file.read_text().strip()) as admin:
            (upload,) = admin.list_uploads()
            got = decode_uplink(admin.upload_data(upload["upload_id"]), upload["manifest"])
        assert torch.equal(got.tokens, feats * keep.unsqueeze(-1)) and got.sample_ids == ["s1", "s3"]

        # cloud: a weight update against its mirror of the device
        device_state = {"layer.norm.weight": torch.ones(64), "proj.lora_A.weight": torch.zeros(4, 300)}
        cloud_state = {"layer.norm.weight": torch.ones(64) * 1.01, "proj.lora_A.weight": torch.randn(4, 300, generator=g)}
        enc = encode_update(cloud_state, device_state, round=1)
        (tmp_path / "r1.vtdw").write_bytes(enc.data)
        _json(capsys, ["cloud", "publish", "--url", url, "--admin-token-file", str(admin_file),
                       "--device", dev["device_id"], "--round", "1", str(tmp_path / "r1.vtdw")])

        # device: pull, verify, apply
        pulled = _json(capsys, ["device", "pull", "--url", url, "--token-file", str(tmp_path / "dev.token"),
                                "--out", str(tmp_path / "pulled.vtdw")])
        assert pulled["bytes"] == len(enc.data)
        apply_update(device_state, (tmp_path / "pulled.vtdw").read_bytes())
        assert state_hash(device_state) == state_hash(enc.mirror)
        status = _json(capsys, ["device", "status", "--url", url, "--token-file", str(tmp_path / "dev.token")])
        assert len(status["uploads"]) == 1 and [u["round"] for u in status["updates"]] == [1]

        # a bad token is one line and exit status 2
        (tmp_path / "bad.token").write_text("nope")
        assert main(["device", "status", "--url", url, "--token-file", str(tmp_path / "bad.token")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "token" in err
    finally:
        server.terminate()
        server.wait(timeout=15)
