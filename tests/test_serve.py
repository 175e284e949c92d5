"""Multi-task serving: a mixed batch equals each task run alone."""

import io
import json

import jax
import numpy as np
import pytest
from conftest import IMAGE_SIZE, TINY
from PIL import Image

from vptpc import checkpoint, serve
from vptpc import prompts as pr
from vptpc.data import pipeline
from vptpc.models import vit


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


def test_serve_cli_reads_stdin_and_writes_json_lines(
  tiny_params, tmp_path, monkeypatch, capsys
):
  frozen, _ = vit.split_head(tiny_params)
  checkpoint.save_npz(tmp_path / "backbone.npz", frozen)
  tasks = _tasks(frozen)
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
  args = [
    f"--task=a={tmp_path / 'a.npz'}",
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
    img = pipeline.normalize(
      np.asarray(Image.open(path).convert("RGB"))[None], "minus1_1"
    )
    c = head["kernel"].shape[-1]
    alone = vit.VisionTransformer(**TINY, num_classes=c, kv_only=True)
    want = alone.apply({"params": vit.merge_head(frozen, head)}, img, prompts)
    assert o["label"] == int(np.argmax(want[0])) and len(o["top5"]) <= c
  monkeypatch.setattr("sys.stdin", io.StringIO("nope x.png\n"))
  assert serve.main(args) == 2
  assert "nope" in capsys.readouterr().err
