"""The vmapped grid equals the same grid run one member at a time."""

import json

import jax
import numpy as np
from test_train import tiny_config

from vptpc import prompts as pr
from vptpc import protocol, sweep, train


def test_vmapped_grid_equals_separate_runs(tmp_path, data_dir):
  def cfg():
    c = tiny_config("epochs=2,num_prompts=3,parallel=jit")
    c.data.data_dir = data_dir
    c.data.train_split = "train[:128]"
    c.data.eval_split = "test[:64]"
    c.warmup_epochs = 1
    # Standardised pre-logits: both paths must export heads for the
    # checkpoint's backbone (`vptpc.build.Setup.export_trainable`).
    c.model.prelogit_norm = "standardize"
    return c

  members = [(1.0, 1e-2), (0.1, 0.0), (0.1, 1e-2)]
  grid = sweep.train_grid_chunked(cfg(), members, chunk=2)  # chunks 2 + 1
  assert [(g["base_lr"], g["weight_decay"]) for g in grid] == members
  for (lr, wd), g in zip(members, grid, strict=True):
    c = cfg()
    c.base_lr, c.weight_decay = lr, wd
    res = train.train_stage(c, str(tmp_path / f"lr{lr}_wd{wd}"), quiet=True)
    prompts, head, _ = pr.load_prompts(res["export"])
    for a, b in zip(
      jax.tree_util.tree_leaves({"prompts": prompts, "head": head}),
      jax.tree_util.tree_leaves(g["trainable"]),
      strict=True,
    ):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert abs(res["eval_accuracy"] - g["eval_accuracy"]) <= 1.5 / 64
  # The members really differ (a bug broadcasting one member would not).
  a, b = grid[0]["trainable"]["head"], grid[1]["trainable"]["head"]
  assert np.abs(a["kernel"] - b["kernel"]).max() > 1e-3


def test_protocol_tune_with_vmap(tmp_path, data_dir):
  c = tiny_config("epochs=1,num_prompts=2,parallel=jit")
  c.data.data_dir = data_dir
  c.protocol.lrs = (1.0, 0.1)
  c.protocol.wds = (0.0,)
  c.protocol.tune_splits = ("train[:128]", "test[:64]")
  c.protocol.vmap = True
  out = protocol.tune(c, str(tmp_path))
  saved = json.loads((tmp_path / "tune.json").read_text())
  assert saved["vmapped"] and len(saved["grid"]) == 2
  assert out["best"]["base_lr"] in (1.0, 0.1)
