"""Multi-task serving: a mixed batch equals each task run alone."""

import io
import json
import os

import jax
import numpy as np
import pytest
from conftest import IMAGE_SIZE, TINY
from PIL import Image

from vptpc import npz_checkpoint, serve
from vptpc import prompts as pr
from vptpc.data import preprocessing
from vptpc.models import swin, swin_family, vit


def _tasks(frozen):
  rng = np.random.default_rng(0)
  out = {}
  for i, (name, counts, classes) in enumerate(
    [("a", (4, 0, 2), 5), ("b", (1, 3, 0), 3), ("c", (0, 0, 0), 4)]
  ):
    p = pr.init_prompts(
      jax.random.key(i),
      num_prompts=counts,
      hidden_size=32,
      patch_size=8,
      num_layers=3,
    )
    p = jax.tree_util.tree_map(lambda a: a * 10, p)
    head = {
      "kernel": rng.normal(size=(32, classes)).astype(np.float32),
      "bias": rng.normal(size=(classes,)).astype(np.float32),
    }
    out[name] = (p, head)
  return out


def test_mixed_task_batch_equals_each_task_alone(tiny_params):
  frozen, _ = vit.split_head(tiny_params)
  tasks = _tasks(frozen)
  bank = serve.build_bank(frozen, tasks, num_heads=TINY["num_heads"])
  assert bank.cache["encoderblock_1"]["key"].shape == (3, 3, 2, 16)
  assert bank.cache["encoderblock_1"]["mask"].tolist() == [
    [False] * 3,
    [True] * 3,
    [False] * 3,
  ]
  images = (
    np.random.default_rng(1)
    .normal(size=(7, IMAGE_SIZE, IMAGE_SIZE, 3))
    .astype(np.float32)
  )
  names = ["a", "b", "c", "a", "c", "b", "b"]
  model = vit.VisionTransformer(**TINY, kv_only=True)
  logits = np.asarray(
    serve.classify(model, frozen, bank, images, bank.task_ids(names))
  )
  for t, (prompts, head) in tasks.items():
    idx = [i for i, n in enumerate(names) if n == t]
    c = head["kernel"].shape[-1]
    alone = vit.VisionTransformer(**TINY, num_classes=c, kv_only=True)
    want = alone.apply(
      {"params": vit.merge_head(frozen, head)}, images[idx], prompts
    )
    np.testing.assert_allclose(logits[idx, :c], want, rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(logits[idx, c:]))
  with pytest.raises(KeyError, match="zzz"):
    bank.task_ids(["a", "zzz"])


def _requests(tmp_path, tasks, frozen, monkeypatch):
  """Saves tasks a and b, writes three images and their stdin lines."""
  for name in ("a", "b"):
    pr.save_prompts(tmp_path / f"{name}.npz", *tasks[name], backbone=frozen)
  rng = np.random.default_rng(2)
  lines = []
  for i, t in enumerate(["a", "b", "a"]):
    path = tmp_path / f"img{i}.png"
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
      path
    )
    lines.append(f"{t} {path}")
  monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
  return lines


def test_serve_cli_reads_stdin_and_writes_json_lines(
  tiny_params, tmp_path, monkeypatch, capsys
):
  frozen, _ = vit.split_head(tiny_params)
  npz_checkpoint.save_npz(tmp_path / "backbone.npz", frozen)
  tasks = _tasks(frozen)
  lines = _requests(tmp_path, tasks, frozen, monkeypatch)
  # Task a as its run's folder, which stands for the prompts.npz in it.
  (tmp_path / "run_a").mkdir()
  os.replace(tmp_path / "a.npz", tmp_path / "run_a" / "prompts.npz")
  args = [
    f"--task=a={tmp_path / 'run_a'}",
    f"--task=b={tmp_path / 'b.npz'}",
    f"--backbone={tmp_path / 'backbone.npz'}",
    "--model=tiny32",
    "--batch_size=2",
  ]
  assert serve.main(args) == 0
  out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert [o["task"] for o in out] == ["a", "b", "a"]
  for o, line in zip(out, lines, strict=True):
    t, path = line.split()
    prompts, head = tasks[t]
    img = preprocessing.normalize(
      np.asarray(Image.open(path).convert("RGB"))[None], "minus1_1"
    )
    c = head["kernel"].shape[-1]
    alone = vit.VisionTransformer(**TINY, num_classes=c, kv_only=True)
    want = alone.apply({"params": vit.merge_head(frozen, head)}, img, prompts)
    assert o["label"] == int(np.argmax(want[0])) and len(o["top5"]) <= c
  monkeypatch.setattr("sys.stdin", io.StringIO("nope x.png\n"))
  assert serve.main(args) == 2
  assert "nope" in capsys.readouterr().err


def test_serve_cli_names_an_ambiguous_folder_and_a_bad_size(tmp_path, capsys):
  # A condensation run's folder: both stages' files are named, no choice
  # is made for the user. Both checks come before any JAX work.
  for stage in ("full", "condensed"):
    (tmp_path / "pc" / stage).mkdir(parents=True)
    (tmp_path / "pc" / stage / "prompts.npz").write_bytes(b"")
  assert serve.main([f"--task=t={tmp_path / 'pc'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and len(err.splitlines()) == 1
  assert "condensed/prompts.npz, full/prompts.npz" in err
  pr.save_prompts(tmp_path / "t.npz", {"input": np.zeros((1, 128))})
  assert serve.main([f"--task=t={tmp_path / 't.npz'}", "--image_size=30"]) == 2
  assert capsys.readouterr().err == (
    "error: --image_size=30 is not a multiple of fractal-Ti/4's patch size "
    "4: the position embedding is resized to a whole patch grid; use 28 or "
    "32.\n"
  )


# --- Swin: every block but the last as keys/values; the last block's padded
# prompts are masked out of attention and out of the average pool. --------

SWIN_COUNTS = [
  ("a", (4, 0, 2, 1, 3, 2), 5),
  ("b", (1, 3, 0, 2, 0, 0), 3),  # no last-block prompts
  ("c", (0, 0, 0, 0, 0, 0), 4),
]


def _swin_tasks(model):
  rng = np.random.default_rng(0)
  out = {}
  for i, (name, counts, classes) in enumerate(SWIN_COUNTS):
    p = swin.init_prompts(jax.random.key(i), model, num_prompts=counts)
    p = jax.tree_util.tree_map(lambda a: a * 10, p)
    head = {
      "kernel": rng.normal(size=(model.num_features, classes)).astype(
        np.float32
      ),
      "bias": rng.normal(size=(classes,)).astype(np.float32),
    }
    out[name] = (p, head)
  return out


@pytest.fixture(scope="module")
def swin_backbone():
  model = swin.create_model("swin-testing", num_classes=None, kv_only=True)
  params = swin.init_params(model, jax.random.key(3), IMAGE_SIZE)
  return model, params


def test_swin_mixed_task_batch_equals_each_task_alone(swin_backbone):
  model, frozen = swin_backbone
  tasks = _swin_tasks(model)
  bank = serve.build_bank(frozen, tasks, model=model)
  last = f"encoderblock_{model.num_layers - 1}"
  assert set(bank.cache[last]) == {"prompts", "mask"}
  assert bank.cache[last]["mask"].tolist() == [[True] * 2, [False] * 2] + [
    [False] * 2
  ]
  assert bank.cache["encoderblock_1"]["key"].shape[:2] == (3, 3)
  images = (
    np.random.default_rng(1)
    .normal(size=(7, IMAGE_SIZE, IMAGE_SIZE, 3))
    .astype(np.float32)
  )
  names = ["a", "b", "c", "a", "c", "b", "b"]
  logits = np.asarray(
    serve.classify(model, frozen, bank, images, bank.task_ids(names))
  )
  for t, (prompts, head) in tasks.items():
    idx = [i for i, n in enumerate(names) if n == t]
    c = head["kernel"].shape[-1]
    # The official full-token path, task by task.
    alone = model.clone(num_classes=c, kv_only=False)
    want = jax.jit(alone.apply)(
      {"params": vit.merge_head(frozen, head)}, images[idx], prompts
    )
    np.testing.assert_allclose(logits[idx, :c], want, rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(logits[idx, c:]))


def _timm_names(params):
  """A Swin params tree as a timm state dict (the inverse of the loader)."""
  flat = npz_checkpoint.flatten(params)
  out = {}
  for k, src in swin_family.checkpoint_sources(flat).items():
    a = np.asarray(flat[k])
    if k.endswith("kernel"):
      a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
    out[src.key] = np.ascontiguousarray(a)
  return out


def test_serve_cli_serves_a_swin_from_a_timm_file(
  swin_backbone, tmp_path, monkeypatch, capsys
):
  from safetensors.numpy import save_file

  model, frozen = swin_backbone
  save_file(_timm_names(frozen), str(tmp_path / "swin.safetensors"))
  tasks = _swin_tasks(model)
  lines = _requests(tmp_path, tasks, frozen, monkeypatch)
  args = [
    f"--task=a={tmp_path / 'a.npz'}",
    f"--task=b={tmp_path / 'b.npz'}",
    f"--backbone={tmp_path / 'swin.safetensors'}",
    "--model=swin-testing",
    "--batch_size=2",
  ]
  assert serve.main(args) == 0
  out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert [o["task"] for o in out] == ["a", "b", "a"]
  # The labels are those of task a's and task b's own models (the bank's
  # equality with them is tested above); here: files in, labels out.
  imgs = preprocessing.normalize(
    np.stack(
      [np.asarray(Image.open(x.split()[1]).convert("RGB")) for x in lines]
    ),
    "minus1_1",
  )
  bank = serve.build_bank(frozen, tasks, model=model)
  want = serve.classify(
    model, frozen, bank, imgs, bank.task_ids(["a", "b", "a"])
  )
  assert [o["label"] for o in out] == np.argmax(want, -1).tolist()


def test_export_refuses_a_swin_task_and_points_to_serve(
  swin_backbone, tmp_path
):
  from vptpc import export, export_formats

  model, frozen = swin_backbone
  pr.save_prompts(tmp_path / "a.npz", *_swin_tasks(model)["a"], backbone=frozen)
  with pytest.raises(export_formats.ExportError, match="Swin.*vptpc.serve"):
    export.export_task(tmp_path / "a.npz", tmp_path / "a.hlo", fmt="stablehlo")
  assert os.listdir(tmp_path) == ["a.npz"]
