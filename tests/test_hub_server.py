"""Tests of the fake Hugging Face Hub (tests/hub_server.py) and of scan_for_secret."""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hub_server import FakeHub, scan_for_secret

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402

REPO = "org/name"


def _make_folder(root: Path) -> dict[str, bytes]:
    """A small output folder: a nested file, a real binary .safetensors, and files to ignore."""
    files: dict[str, bytes] = {
        "config.json": b'{"_class_name": "DiTPipeline"}\n',
        "transformer/nested/diffusion_pytorch_model.json": b'{"a": 1}\n',
        "binary.bin": bytes(range(256)) * 4 + b"\x00\r\n\x1f\x8b",  # every byte value, CR/LF, NULs
    }
    try:
        import numpy as np
        from safetensors.numpy import save

        files["transformer/model.safetensors"] = save(
            {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.full(3, -1.5, dtype=np.float32)}
        )
    except ImportError:
        files["transformer/model.safetensors"] = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256))
    ignored = {"logs/train.log": b"log line\n", "checkpoint-1/optimizer.bin": b"\x00" * 16}
    for rel, data in {**files, **ignored}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _assert_clean(hub: FakeHub) -> None:
    assert hub.unhandled == [], [str(r) for r in hub.unhandled]
    assert hub.errors == []


@pytest.fixture
def offline_first(monkeypatch):
    """Simulate the suite-wide HF_HUB_OFFLINE=1 (env and already-imported constant) before fake_hub."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def test_in_process_create_repo_and_upload_folder(offline_first, fake_hub, tmp_path):
    src = tmp_path / "out"
    expected = _make_folder(src)
    api = HfApi(endpoint=fake_hub.endpoint, token=fake_hub.token)

    url = api.create_repo(REPO, exist_ok=True, private=True)
    assert url.repo_id == REPO
    api.create_repo(REPO, exist_ok=True, private=True)  # exists -> 409 -> accepted
    info = api.upload_folder(folder_path=src, repo_id=REPO, ignore_patterns=["*.log", "checkpoint-*/*"])

    assert info.oid and info.commit_url.startswith(fake_hub.endpoint)
    assert fake_hub.files[REPO] == expected  # byte-exact, nothing ignored got through
    assert fake_hub.is_private(REPO) is True
    assert [c["status"] for c in fake_hub.created] == [200, 409]
    assert all(c["private"] for c in fake_hub.created)
    assert len(fake_hub.commits) == 1 and fake_hub.commits[0]["revision"] == "main"
    assert sorted(fake_hub.commits[0]["added"]) == sorted(expected)
    hit = fake_hub.endpoints_hit()
    assert "POST /api/repos/create" in hit
    assert f"POST /api/models/{REPO}/preupload/main" in hit
    assert f"POST /api/models/{REPO}/commit/main" in hit
    _assert_clean(fake_hub)


def test_in_process_default_endpoint_and_module_functions(offline_first, fake_hub, tmp_path):
    """No endpoint= anywhere: HfApi() and huggingface_hub.upload_file (what diffusers calls)."""
    assert not huggingface_hub.constants.is_offline_mode()
    HfApi().create_repo("name", exist_ok=True)  # no org -> the token's user namespace
    huggingface_hub.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n# card\n", path_in_repo="README.md",
                                repo_id="fake-user/name")
    assert fake_hub.files["fake-user/name"] == {"README.md": b"---\nlicense: mit\n---\n# card\n"}
    assert fake_hub.is_private("fake-user/name") is False
    # README.md is validated first; a round trip through /resolve works too
    assert "POST /api/validate-yaml" in fake_hub.endpoints_hit()
    path = huggingface_hub.hf_hub_download("fake-user/name", "README.md", cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes().startswith(b"---\nlicense: mit")
    _assert_clean(fake_hub)


def test_subprocess_with_only_endpoint_and_token(fake_hub, tmp_path):
    src = tmp_path / "out"
    expected = _make_folder(src)
    code = textwrap.dedent(
        f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo({REPO!r}, exist_ok=True, private=False)
        print(api.upload_folder(folder_path={str(src)!r}, repo_id={REPO!r},
                                ignore_patterns=["*.log", "checkpoint-*/*"]).oid)
        """
    )
    # HOME only keeps the child's HF cache (hf_xet logs, agent registry) out of the real home.
    env = {"HF_ENDPOINT": fake_hub.endpoint, "HF_TOKEN": fake_hub.token, "HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == fake_hub.commits[-1]["oid"]
    assert fake_hub.files[REPO] == expected
    assert fake_hub.is_private(REPO) is False
    _assert_clean(fake_hub)


def test_subprocess_inheriting_fixture_env_despite_global_offline(offline_first, fake_hub, tmp_path):
    code = (
        "import huggingface_hub as h; h.create_repo('org/inh', exist_ok=True); "
        "h.upload_file(path_or_fileobj=b'abc', path_in_repo='x/y.txt', repo_id='org/inh')"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert fake_hub.files["org/inh"] == {"x/y.txt": b"abc"}


def test_authorization_header_carries_token(fake_hub, tmp_path):
    src = tmp_path / "out"
    _make_folder(src)
    api = HfApi(endpoint=fake_hub.endpoint, token=fake_hub.token)
    api.create_repo(REPO, exist_ok=True)
    api.upload_folder(folder_path=src, repo_id=REPO)
    api_requests = [r for r in fake_hub.requests if r.path.startswith(("/api/repos", f"/api/models/{REPO}"))]
    assert len(api_requests) >= 3
    for r in api_requests:
        assert r.authorization == f"Bearer {fake_hub.token}", str(r)
        assert r.header("AUTHORIZATION") == r.authorization  # lookup is case-insensitive

    # A wrong token is refused and stores nothing.
    before = fake_hub.files
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=fake_hub.endpoint, token="hf_wrong").upload_file(
            path_or_fileobj=b"x", path_in_repo="evil.txt", repo_id=REPO
        )
    assert exc.value.response.status_code == 401
    assert fake_hub.files == before
    # The token appears in headers only, never in a request body.
    assert scan_for_secret(tmp_path / "nonexistent", fake_hub.token, fake_hub.bodies) == []


def test_gzip_and_chunked_commit_body_and_bounds():
    lines = [
        {"key": "header", "value": {"summary": "raw client", "description": ""}},
        {"key": "file", "value": {"path": "a/b.bin", "encoding": "base64",
                                  "content": base64.b64encode(b"\x00\xffdata").decode()}},
    ]
    payload = gzip.compress(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    with FakeHub(token="tok", max_body_bytes=64 * 1024) as hub:
        conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=5)
        conn.request("POST", "/api/repos/create", body=json.dumps({"name": "r", "organization": "o"}),
                     headers={"Authorization": "Bearer tok", "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["url"].endswith("/o/r")
        chunks = iter([payload[:10], payload[10:]])
        conn.request("POST", "/api/models/o/r/commit/main", body=chunks, encode_chunked=True,
                     headers={"Authorization": "Bearer tok", "Content-Encoding": "gzip",
                              "Content-Type": "application/x-ndjson", "Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert json.loads(resp.read())["commitOid"]
        assert hub.files["o/r"] == {"a/b.bin": b"\x00\xffdata"}
        assert hub.requests[-1].raw_body == payload and hub.requests[-1].body.startswith(b'{"key": "header"')

        # Over the body limit: 413, connection closed, nothing stored.
        conn.request("POST", "/api/models/o/r/commit/main", body=b"x" * (64 * 1024 + 1),
                     headers={"Authorization": "Bearer tok"})
        assert conn.getresponse().status == 413
        conn.close()
        # Unknown endpoints are 404 and recorded.
        conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=5)
        conn.request("GET", "/api/spaces/o/r/runtime")
        assert conn.getresponse().status == 404
        conn.close()
        assert [str(r) for r in hub.unhandled] == ["GET /api/spaces/o/r/runtime -> 404"]
        port = hub.port
    with pytest.raises(OSError):  # stopped on exit
        http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/")


# ----------------------------------------------------------------------------- scan_for_secret
SECRET = "hf_plantedSecretValue_0123456789"


def _clean_tree(root: Path) -> None:
    (root / "sub" / ".hidden").mkdir(parents=True)
    (root / "config.json").write_text('{"token": null}')
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 8)
    (root / "sub" / ".hidden" / "x.txt").write_text("nothing here hf_other")
    (root / "events.out.tfevents.1.host").write_bytes(gzip.compress(b"\x00scalar loss 0.1\x00" * 10))


def test_scan_for_secret_clean(tmp_path):
    _clean_tree(tmp_path)
    assert scan_for_secret(tmp_path, SECRET) == []
    assert scan_for_secret(tmp_path, SECRET, ["log without it", b"bytes too"]) == []


def test_scan_for_secret_finds_planted(tmp_path):
    _clean_tree(tmp_path)
    planted = {
        tmp_path / "sub" / "weights.bin": bytes(range(256)) + SECRET.encode() + b"\x00\xff",
        tmp_path / "sub" / ".hidden" / "args.yaml": f"push_to_hub: true\nhub_token: {SECRET}\n".encode(),
        tmp_path / "events.out.tfevents.2.host": gzip.compress(b"\x00text/" + SECRET.encode() + b"\x00"),
        tmp_path / "payload.ndjson": json.dumps(
            {"content": base64.b64encode(b"xy" + SECRET.encode() + b"z").decode()}).encode(),
        tmp_path / "wide.txt": SECRET.encode("utf-16-le"),
    }
    for path, data in planted.items():
        path.write_bytes(data)
    hits = scan_for_secret(tmp_path, SECRET, ["clean", f"Authorization: Bearer {SECRET}"])
    assert sorted(hits[:-1]) == sorted(str(p) for p in planted)
    assert hits[-1] == "extra_texts[1]"
    assert scan_for_secret(tmp_path / "wide.txt", SECRET) == [str(tmp_path / "wide.txt")]
    with pytest.raises(ValueError):
        scan_for_secret(tmp_path, "")


# ----------------------------------------------------------------------------- no local paths on the Hub
def test_push_to_hub_uploads_no_local_paths(fake_hub, tmp_path, capsys):
    """A run on a local base model and data folder, pushed: the card, training_config.yaml, the components'
    config.json and everything else uploaded name local paths by their last component only."""
    import yaml
    from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

    from sadm_finetune.cli import main

    base = build_tiny_dit_pipeline(tmp_path / "my-base", num_classes=2)
    data = build_image_folder(tmp_path / "my-data", per_class=2)
    out = tmp_path / "my-out"
    argv = ["--pretrained", str(base), "--train_data_dir", str(data), "--output_dir", str(out),
            "--max_train_steps", "1", "--train_batch_size", "2", "--disc_width", "8", "--disc_depth", "2",
            "--disc_embed_dim", "16", "--num_validation_images", "1", "--validation_inference_steps", "1",
            "--report_to", "tensorboard", "--push_to_hub", "--hub_model_id", "org/sadm-paths"]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    stored = fake_hub.repo_files("org/sadm-paths")
    assert {"README.md", "training_config.yaml", "model_index.json", "transformer/config.json"} <= set(stored)
    assert "transformer/diffusion_pytorch_model.safetensors" in stored

    local = [str(tmp_path), str(tmp_path.resolve()), str(tmp_path.resolve().parents[1])]  # pytest-of-<user>
    home = os.path.expanduser("~")
    if len(home) > 1:
        local.append(home)
    for name, data_bytes in stored.items():
        for path in local:
            assert path.encode() not in data_bytes, (name, path)

    uploaded = yaml.safe_load(stored["training_config.yaml"])
    assert uploaded["model"]["pretrained_model_name_or_path"] == "my-base"
    assert uploaded["data"]["train_data_dir"] == "my-data" and uploaded["training"]["output_dir"] == "my-out"
    on_disk = yaml.safe_load((out / "training_config.yaml").read_text())  # the local copy keeps full paths
    assert on_disk["model"]["pretrained_model_name_or_path"] == str(base)
    card = stored["README.md"].decode()
    assert "`my-base`" in card and "--train_data_dir my-data" in card
    assert json.loads(stored["transformer/config.json"])["_name_or_path"].startswith("my-base")
    logs = [p for p in out.rglob("events.out.tfevents.*")]
    # the tracker's hyper-parameter record holds the paths: left out (the scalar log goes up)
    assert logs and any(p.relative_to(out).as_posix() not in stored for p in logs)
    assert "left out" in capsys.readouterr().out
    _assert_clean(fake_hub)
