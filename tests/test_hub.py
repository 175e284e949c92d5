"""vptpc.hub and `prepare --weights`, against a local fake hub (no internet).

The fake hub answers ``HEAD``/``GET /timm/<name>/resolve/main/model.safetensors``
with the headers ``huggingface_hub.file_download`` reads: ``X-Repo-Commit``,
``X-Linked-Etag`` (the LFS sha256), ``X-Linked-Size``, ``ETag`` and
``Content-Length``; with no ``X-Xet-Hash`` the library downloads over plain
HTTP. ``HF_ENDPOINT`` points the library (and `vptpc.hub`) at it.
"""

import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
from safetensors.numpy import save_file

from vptpc import hub, prepare
from vptpc.models import registry

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The registry may restrict --weights to its own names: use one of them.
_KNOWN = getattr(registry, "timm_weight_names", None)
NAME = list(_KNOWN())[0] if _KNOWN else "vit_tiny_patch16_224.augreg_in21k"
NAME = NAME.removeprefix("timm/")
REPO = f"timm/{NAME}"
_HF_VARS = (
  "HF_HOME",
  "HF_HUB_CACHE",
  "HUGGINGFACE_HUB_CACHE",
  "XDG_CACHE_HOME",
  "HF_ENDPOINT",
  "HF_HUB_OFFLINE",
  "TRANSFORMERS_OFFLINE",
  "HF_TOKEN",
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """Bytes of a tiny real safetensors file (one 2x2 array)."""
  path = tmp_path_factory.mktemp("w") / "model.safetensors"
  save_file({"w": np.arange(4, dtype=np.float32).reshape(2, 2)}, str(path))
  return path.read_bytes()


class FakeHub:
  """A threaded HTTP server that answers as the hub does for one file."""

  def __init__(self, body: bytes):
    self.body = body
    self.sha = hashlib.sha256(body).hexdigest()
    self.mode = "ok"  # "ok", "404", or "corrupt" (wrong bytes, right sha)
    self.requests: list[tuple[str, str]] = []
    fake = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def _answer(self, send_body: bool):
        fake.requests.append((self.command, self.path))
        m = re.fullmatch(
          r"/timm/([^/]+)/resolve/(main|[0-9a-f]{40})/model\.safetensors",
          self.path,
        )
        if m is None or fake.mode == "404":
          self.send_response(404)
          self.send_header("X-Error-Code", "RepoNotFound")
          self.send_header("X-Error-Message", "Repository not found")
          self.send_header("Content-Length", "0")
          self.end_headers()
          return
        body = fake.body
        if fake.mode == "corrupt":
          body = bytes(len(body))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{fake.sha}"')
        self.send_header("X-Linked-Etag", f'"{fake.sha}"')
        self.send_header("X-Linked-Size", str(len(body)))
        self.end_headers()
        if send_body:
          self.wfile.write(body)

      def do_HEAD(self):
        self._answer(False)

      def do_GET(self):
        self._answer(True)

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
    self.thread = threading.Thread(
      target=self.server.serve_forever, kwargs={"poll_interval": 0.05}
    )
    self.thread.daemon = True
    self.thread.start()

  def gets(self) -> int:
    return sum(1 for c, _ in self.requests if c == "GET")

  def close(self):
    self.server.shutdown()
    self.server.server_close()


@pytest.fixture
def fake_hub(weights):
  server = FakeHub(weights)
  yield server
  server.close()


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
  """A fresh HF_HOME; no other Hugging Face variables."""
  for k in _HF_VARS:
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
  monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
  no_proxy = "127.0.0.1,localhost"
  monkeypatch.setenv("NO_PROXY", no_proxy)
  monkeypatch.setenv("no_proxy", no_proxy)
  return tmp_path / "hf" / "hub"


def _lay_out_cache(cache, repo: str, body: bytes) -> str:
  """Writes ``model.safetensors`` of ``repo`` as huggingface_hub does."""
  folder = cache / f"models--{repo.replace('/', '--')}"
  sha = hashlib.sha256(body).hexdigest()
  (folder / "blobs").mkdir(parents=True)
  (folder / "blobs" / sha).write_bytes(body)
  (folder / "refs").mkdir()
  (folder / "refs" / "main").write_text(COMMIT)
  snap = folder / "snapshots" / COMMIT
  snap.mkdir(parents=True)
  os.symlink(f"../../blobs/{sha}", snap / hub.WEIGHTS_FILE)
  return str(snap / hub.WEIGHTS_FILE)


def _prepare(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "vptpc.prepare", *args],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    env=dict(os.environ),
    timeout=120,
  )


def _error_lines(stderr: str) -> list[str]:
  return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_cache_dir_follows_env_at_call_time(hf_env, monkeypatch, tmp_path):
  assert hub.hub_cache_dir() == str(hf_env)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
  assert hub.hub_cache_dir() == str(tmp_path / "elsewhere")


def test_cached_and_resolve(hf_env, weights):
  want = _lay_out_cache(hf_env, REPO, weights)
  assert hub.cached_weights(NAME) == want
  assert hub.cached_weights(REPO) == want
  assert hub.resolve_weights(REPO) == want
  with open(hub.resolve_weights(NAME), "rb") as f:
    assert f.read() == weights
  assert hub.cached_weights("vit_missing.tag") is None
  with pytest.raises(hub.WeightsNotCached) as e:
    hub.resolve_weights("vit_missing.tag")
  assert str(e.value) == (
    f"no cached weights for timm/vit_missing.tag in {hf_env}; run: "
    "python -m vptpc.prepare --weights=timm/vit_missing.tag"
  )
  assert isinstance(e.value, ValueError)
  with pytest.raises(hub.WeightsNotCached, match="fetch_weights"):
    hub.resolve_weights("vit_missing.tag", prepare_cmd_known=False)


def test_bad_names():
  assert hub.repo_id("a.b") == hub.repo_id("timm/a.b") == "timm/a.b"
  for bad in ("vit_base_patch16_224", "timm/vit_base_patch16_224", "x."):
    with pytest.raises(ValueError, match=re.escape(repr(bad))) as e:
      hub.repo_id(bad)
    assert "tag" in str(e.value) and ".lvd142m" in str(e.value)
  with pytest.raises(ValueError, match="'google/vit.b'"):
    hub.repo_id("google/vit.b")
  known = ["vit_base_patch16_224.augreg_in21k", "timm/vit_small.x"]
  assert hub.repo_id("timm/vit_small.x", known) == "timm/vit_small.x"
  with pytest.raises(hub.HubError) as e:
    hub.fetch_weights("vit_huge.y", known=known)
  msg = str(e.value)
  assert "'vit_huge.y'" in msg and "\n" not in msg
  assert msg.endswith("vit_base_patch16_224.augreg_in21k, vit_small.x.")


def test_fetch_in_process(hf_env, fake_hub, monkeypatch, weights):
  from huggingface_hub import constants

  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)  # read at call time
  path = hub.fetch_weights(NAME)
  assert path.startswith(str(hf_env))
  assert open(path, "rb").read() == weights
  assert hub.cached_weights(NAME) == path
  # Bytes that do not match the hub's sha256 are removed, not kept.
  fake_hub.mode = "corrupt"
  with pytest.raises(hub.HubError, match="sha256") as e:
    hub.fetch_weights("vit_other.corrupt")
  assert "\n" not in str(e.value)
  assert hub.cached_weights("vit_other.corrupt") is None
  fake_hub.mode = "404"
  with pytest.raises(hub.HubError) as e:
    hub.fetch_weights("vit_other.missing")
  msg = str(e.value)
  assert "timm/vit_other.missing" in msg and "404" in msg
  assert "\n" not in msg


def test_prepare_downloads_once(hf_env, fake_hub, monkeypatch, weights, capsys):
  from huggingface_hub import constants

  monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
  r = _prepare(f"--weights={REPO}")  # a fresh process: end to end
  assert r.returncode == 0, r.stderr
  path = hub.cached_weights(NAME)
  assert path is not None and path.startswith(str(hf_env))
  assert open(path, "rb").read() == weights
  assert r.stdout.strip() == f"{REPO}: {path}"
  assert fake_hub.gets() == 1
  # Cached: said so, nothing asked of the hub (in this process, to save
  # a start-up; hub.py reads the environment at each call).
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  capsys.readouterr()
  seen = len(fake_hub.requests)
  assert prepare.main([f"--weights={REPO}"]) == 0
  out = capsys.readouterr()
  assert out.out.strip() == f"{REPO}: {path} (already cached)", out.err
  assert len(fake_hub.requests) == seen
  # A hub that answers 404: one error line, exit 2.
  fake_hub.mode = "404"
  monkeypatch.setenv("HF_HOME", str(hf_env.parent / "other"))
  assert prepare.main([f"--weights={REPO}"]) == 2
  out = capsys.readouterr()
  errors = _error_lines(out.err)
  assert len(errors) == 1 and REPO in errors[0] and "404" in errors[0]
  assert out.out == ""
  assert len(fake_hub.requests) > seen


def test_prepare_offline_not_cached(hf_env, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never asked
  name = REPO if _KNOWN else "timm/x.y"
  r = _prepare(f"--weights={name}")
  assert r.returncode == 2, (r.stdout, r.stderr)
  errors = _error_lines(r.stderr)
  assert len(errors) == 1, r.stderr
  assert name in errors[0] and "HF_HUB_OFFLINE" in errors[0]
  assert not hf_env.exists()


def test_prepare_needs_tasks_or_weights(capsys):
  with pytest.raises(SystemExit) as e:
    prepare.main([])
  assert e.value.code == 2
  assert "--weights" in capsys.readouterr().err
  assert prepare.main(["--weights= ,"]) == 2
  assert _error_lines(capsys.readouterr().err) == ["error: --weights is empty."]
