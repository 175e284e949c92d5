"""A run per timm ViT variant, its weights found in the hub cache by name.

Each variant's tiny timm model (tests/data, `test_timm_variants`) is laid
out as the Hugging Face hub library caches ``timm/<name>``; `configs/folder.py`
given the timm name alone (shrunk by ``config.model.arch``) finds it there,
takes the checkpoint's preprocessing, trains, condenses and fine-tunes.
"""

import os
import shutil
import subprocess
import sys

import pytest

from tests.test_folder_config import class_folders, folder_config
from tests.test_timm_variants import DATA, VARIANTS
from vptpc import hub, protocol

TINY_ARCH = "patch_size=8,hidden_size=16,num_layers=2,num_heads=2,mlp_dim=32"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cache_as_hub(hf_home, key):
  """Puts a tiny file where the hub library caches ``timm/<name>``."""
  name = VARIANTS[key]
  repo = os.path.join(hf_home, "hub", f"models--timm--{name}")
  rev = "0" * 40
  snap = os.path.join(repo, "snapshots", rev)
  os.makedirs(snap, exist_ok=True)
  os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
  with open(os.path.join(repo, "refs", "main"), "w") as f:
    f.write(rev)
  shutil.copy(
    os.path.join(DATA, f"timm_{key}_tiny.safetensors"),
    os.path.join(snap, hub.WEIGHTS_FILE),
  )
  return name


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_variant_runs_through_condensation(tmp_path, monkeypatch, key):
  hf_home = str(tmp_path / "hf")
  monkeypatch.setenv("HF_HOME", hf_home)
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  name = cache_as_hub(hf_home, key)
  root = class_folders(tmp_path, n=4)
  c = folder_config(
    f"root={root},model={name},image_size=32,epochs=1,batch_size=6,"
    "num_prompts=2,condense_keep=0.5"
  )
  assert c.model.checkpoint_path == f"hf-hub:timm/{name}"
  want_norm = {"clip_openai": "clip", "clip_laion": "clip", "gap": "minus1_1"}
  assert c.data.normalize == want_norm.get(key, "imagenet")
  c.model.arch = TINY_ARCH
  c.parallel = "jit"
  c.progress_bar = False
  res = protocol.run(c, str(tmp_path / "run"))
  assert res["full"]["prompts_total"] == 4
  assert res["condensed"]["prompts_total"] == 2  # half of 2 x 2 blocks
  assert res["full"]["gflops_naive"] > res["condensed"]["gflops_naive"]


def test_uncached_weights_fail_in_preflight(tmp_path):
  root = class_folders(tmp_path, n=2)
  env = dict(os.environ, HF_HOME=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
  env.pop("HF_HUB_CACHE", None)
  name = VARIANTS["dinov2"]
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "vptpc.main",
      f"--config=configs/folder.py:root={root},model={name}",
      f"--workdir={tmp_path / 'run'}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert p.returncode == 2, p.stderr[-2000:]
  errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
  assert errors and f"--weights=timm/{name}" in errors[0], p.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def _truncated(tmp_path):
  src = os.path.join(DATA, "timm_dinov2_tiny.safetensors")
  data = open(src, "rb").read()
  path = tmp_path / "cut.safetensors"
  path.write_bytes(data[: len(data) // 2])  # a download cut short
  return str(path)


@pytest.mark.parametrize(
  "case, args, says",
  [
    (
      "another variant's file",
      "model=vit_base_patch16_clip_224.openai,"
      "checkpoint={data}/timm_dinov2_tiny.safetensors",
      "2 missing (e.g. Transformer/norm_pre",
    ),
    (
      "an unknown timm name",
      "model=vit_base_patch16_224.nope",
      "known: vit_base_patch16_224.orig_in21k",
    ),
    (
      "a size off the patch grid",
      "model=vit_base_patch14_dinov2.lvd142m,"
      "checkpoint={data}/timm_dinov2_tiny.safetensors,image_size=30",
      "use 24 or 32",
    ),
    (
      "a truncated file",
      "model=vit_base_patch14_dinov2.lvd142m,checkpoint={cut}",
      "not a readable .safetensors file",
    ),
  ],
)
def test_bad_backbone_input_is_one_error_line(tmp_path, case, args, says):
  root = class_folders(tmp_path, n=2)
  args = args.format(data=DATA, cut=_truncated(tmp_path))
  if "image_size" not in args:
    args += ",image_size=32"
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "vptpc.main",
      f"--config=configs/folder.py:root={root},{args}",
      f"--config.model.arch={TINY_ARCH}",
      f"--workdir={tmp_path / 'run'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert p.returncode == 2, (case, p.stderr[-2000:])
  errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
  assert len(errors) == 1 and says in errors[0], (case, p.stderr[-2000:])
  assert len(errors[0]) < 700, errors[0]
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "run").exists()


def test_variant_tunes_its_grid_vmapped(tmp_path, monkeypatch):
  import json

  hf_home = str(tmp_path / "hf")
  monkeypatch.setenv("HF_HOME", hf_home)
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  name = cache_as_hub(hf_home, "dinov2_reg4")
  root = class_folders(tmp_path, n=4)
  c = folder_config(
    f"root={root},model={name},image_size=32,epochs=1,batch_size=6,"
    "num_prompts=2,mode=tune"
  )
  c.model.arch = TINY_ARCH
  c.protocol.lrs, c.protocol.wds = (1.0, 0.1), (0.0,)
  c.protocol.vmap = True
  c.parallel = "jit"
  c.progress_bar = False
  protocol.run(c, str(tmp_path / "run"))
  saved = json.loads((tmp_path / "run" / "tune.json").read_text())
  assert saved["vmapped"] and len(saved["grid"]) == 2
