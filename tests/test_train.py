"""Tests for the train step (jit vs pmap), the loop, resume and the CLI."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE_SIZE, TINY

from vptpc import build, config_util, optim, parallel, runner, steps, train
from vptpc import prompts as pr
from vptpc.data import pipeline
from vptpc.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(arg=None, **overrides):
  spec = importlib.util.spec_from_file_location(
    "tiny_cfg", os.path.join(ROOT, "configs", "tiny.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.progress_bar = False
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def test_jit_and_pmap_steps_give_the_same_state(tiny_params):
  assert jax.local_device_count() == 8
  model = vit.VisionTransformer(**TINY, num_classes=5)
  frozen, head = vit.split_head(tiny_params)
  prompts = pr.init_prompts(
    jax.random.key(1), num_prompts=3, hidden_size=32, patch_size=8, num_layers=3
  )
  schedule = optim.create_lr_schedule(
    base_lr=5.0,
    batch_size=16,
    steps_per_epoch=1,
    total_epochs=10,
    warmup_epochs=1,
  )
  opt = optim.create_optimizer(schedule, weight_decay=1e-3)
  step_fn = steps.make_train_step(model, opt, schedule)
  rng = np.random.default_rng(0)
  batches = [
    {
      "image": rng.normal(size=(16, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(
        np.float32
      ),
      "label": rng.integers(0, 5, 16).astype(np.int32),
      # A padded last batch: masked examples must not count on any device.
      "mask": np.arange(16) < (16 if i < 3 else 11),
    }
    for i in range(4)
  ]
  key = jax.random.key(0)

  state0 = jax.device_get(
    steps.create_train_state({"prompts": prompts, "head": head}, opt)
  )
  jit_step = parallel.jit_train_step(step_fn)
  s_jit = jax.device_put(state0)
  jit_metrics = []
  for b in batches:
    s_jit, m = jit_step(s_jit, frozen, b, key)
    jit_metrics.append(jax.device_get(m))

  pmap_step = parallel.pmap_train_step(step_fn)
  s_pmap = parallel.replicate(jax.device_get(state0))
  rep_frozen = parallel.replicate(frozen)
  for b, mj in zip(batches, jit_metrics, strict=True):
    s_pmap, m = pmap_step(s_pmap, rep_frozen, parallel.shard_batch(b), key)
    m = jax.device_get(parallel.unreplicate(m))
    np.testing.assert_allclose(m["train_loss"], mj["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(m["l2_grads"], mj["l2_grads"], rtol=1e-4)
  s_pmap = jax.device_get(parallel.unreplicate(s_pmap))
  s_jit = jax.device_get(s_jit)
  assert int(s_pmap.step) == int(s_jit.step) == 4
  moved = jax.tree_util.tree_map(
    lambda a, b: np.abs(a - b).max(), s_jit.trainable, state0.trainable
  )
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3  # It did train.
  # pmap sums the gradient across devices in another order than jit sums
  # the batch: after four steps an entry near zero can differ by ~1.5e-6
  # (seen on one 2-core machine with the code before and after a change).
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    s_pmap.trainable,
    s_jit.trainable,
  )


def test_gradients_reach_only_prompts_and_head(tiny_params):
  model = vit.VisionTransformer(**TINY, num_classes=5)
  frozen, head = vit.split_head(tiny_params)
  prompts = pr.init_prompts(
    jax.random.key(1), num_prompts=2, hidden_size=32, patch_size=8, num_layers=3
  )
  schedule = optim.create_lr_schedule(
    base_lr=1.0,
    batch_size=4,
    steps_per_epoch=1,
    total_epochs=2,
    warmup_epochs=0,
  )
  opt = optim.create_optimizer(schedule, weight_decay=0.0)
  state = jax.device_get(
    steps.create_train_state({"prompts": prompts, "head": head}, opt)
  )
  # The optimiser state covers exactly the trainable tree, not the backbone.
  n_opt = vit.count_params(state.opt_state)
  # (one momentum buffer per trainable scalar, plus the schedule counter)
  assert n_opt == vit.count_params(state.trainable) + 1
  batch = {
    "image": jnp.ones((4, 32, 32, 3)),
    "label": jnp.arange(4) % 5,
    "mask": jnp.ones(4, bool),
  }
  step = jax.jit(steps.make_train_step(model, opt, schedule))
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  new, _ = step(state, frozen, batch, jax.random.key(0))
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, frozen_before, jax.device_get(frozen)
  )
  assert not np.allclose(
    new.trainable["prompts"]["encoderblock_2"],
    state.trainable["prompts"]["encoderblock_2"],
  )


def test_train_and_evaluate_one_step_end_to_end(tmp_path, data_dir):
  c = tiny_config(
    "epochs=1,batch_size=64",
    **{"data.data_dir": data_dir, "data.train_split": "train[:64]"},
  )
  c.warmup_epochs = 0
  res = train.train_and_evaluate(c, str(tmp_path))
  assert res["step"] == 1
  assert res["eval_examples"] == 200  # the whole test split, once
  assert 0.0 <= res["eval_accuracy"] <= 1.0
  for f in ("config.json", "versions.json", "metrics.jsonl", "results.json"):
    assert (tmp_path / f).exists(), f
  versions = json.loads((tmp_path / "versions.json").read_text())
  assert versions["jax"] == jax.__version__ and "git_sha" in versions
  assert os.listdir(tmp_path / "tensorboard")
  assert (tmp_path / "checkpoints" / "1").exists()
  records = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert {"train_loss", "lr", "l2_grads", "img_per_s"} <= set(records[0])
  assert records[-1]["eval_num_examples"] == 200
  # The export is the small standalone prompt file, checked on load.
  model = build.build_model(c)
  backbone, _ = build.load_backbone(c, model)
  p, head, meta = pr.load_prompts(tmp_path / "prompts.npz", backbone=backbone)
  assert pr.prompts_per_layer(p) == (4, 4, 4) and head["bias"].shape == (4,)
  assert meta["metadata"]["eval_accuracy"] == res["eval_accuracy"]
  # No backbone weights are written to the workdir.
  total = sum(
    os.path.getsize(os.path.join(d, f))
    for d, _, fs in os.walk(tmp_path)
    for f in fs
  )
  assert total < 2_000_000


def test_resume_after_stop_matches_uninterrupted(tmp_path, data_dir):
  def cfg():
    # 800 / 64 -> 13 steps per epoch; checkpoints every 13; stop at 17.
    return tiny_config(
      "epochs=2,num_prompts=3,parallel=jit",
      **{"data.data_dir": data_dir, "prompt.dropout": 0.1},
    )

  full = train.train_and_evaluate(cfg(), str(tmp_path / "full"))
  part = train.train_and_evaluate(
    cfg(), str(tmp_path / "part"), stop_after_steps=17
  )
  assert part == {"stopped_at_step": 17}
  assert not (tmp_path / "part" / "prompts.npz").exists()
  resumed = train.train_and_evaluate(cfg(), str(tmp_path / "part"))
  assert resumed["step"] == full["step"] == 26
  a, ha, _ = pr.load_prompts(tmp_path / "full" / "prompts.npz")
  b, hb, _ = pr.load_prompts(tmp_path / "part" / "prompts.npz")
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ha["kernel"], hb["kernel"], rtol=1e-6, atol=1e-7)
  assert resumed["eval_accuracy"] == full["eval_accuracy"]
  # Each step is logged once, as in the uninterrupted run (plus the stop).
  steps = [
    json.loads(x)["step"] for x in open(tmp_path / "part" / "metrics.jsonl")
  ]
  full_steps = [
    json.loads(x)["step"] for x in open(tmp_path / "full" / "metrics.jsonl")
  ]
  assert steps == sorted(full_steps[:-1] + [17]) + [26]


def test_pmap_run_and_eval_only(tmp_path, data_dir):
  c = tiny_config("epochs=1", **{"data.data_dir": data_dir})
  res = train.train_and_evaluate(c, str(tmp_path))  # auto -> pmap on 8
  assert res["step"] == 13
  c.eval_only = True
  again = train.train_and_evaluate(c, str(tmp_path))
  assert again["step"] == 13
  assert again["eval_accuracy"] == pytest.approx(res["eval_accuracy"])


def test_eval_only_without_checkpoint_is_an_error(tmp_path, data_dir):
  from vptpc.preflight import PreflightError

  c = tiny_config("epochs=1", **{"data.data_dir": data_dir})
  c.eval_only = True
  # A precondition: reported before anything is written (it used to be a
  # FileNotFoundError after the workdir's config.json was written).
  with pytest.raises(PreflightError, match="no checkpoint"):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_non_finite_loss_aborts_with_message(tmp_path, data_dir):
  c = tiny_config("epochs=2,base_lr=1e30,parallel=jit")
  c.data.data_dir = data_dir
  c.warmup_epochs = 0
  c.log_every_steps = 1
  with pytest.raises(FloatingPointError, match="Non-finite training loss"):
    train.train_and_evaluate(c, str(tmp_path))


def test_batch_must_split_over_devices():
  with pytest.raises(
    ValueError, match="batch_size=12 is not divisible by the 8"
  ):
    parallel.resolve_mode("pmap", 12)
  assert parallel.resolve_mode("auto", 16) == "pmap"
  assert parallel.resolve_mode("jit", 12) == "jit"


def test_unknown_and_bad_config_keys_are_named():
  with pytest.raises(ValueError, match="bogus"):
    tiny_config("bogus=1")
  c = tiny_config()
  c.lock()
  with pytest.raises((AttributeError, KeyError), match="base_lrr"):
    c.base_lrr = 1.0
  c.unlock()
  c.data.normalize = "zscore"
  with pytest.raises(config_util.ConfigError, match="data.normalize"):
    config_util.validate(c)


def test_cli_names_an_unknown_override(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "vptpc.main",
      "--config=configs/tiny.py",
      "--config.modle.name=x",
      f"--workdir={tmp_path}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 2
  assert "modle" in out.stderr and "Traceback" not in out.stderr


def test_zero_prompt_layers_checkpoint_and_resume(tmp_path, data_dir):
  # Head-only (linear probe) runs have (0, D) prompt arrays, which Orbax
  # cannot store; they must still checkpoint and resume.
  def cfg():
    return tiny_config(
      "epochs=2,num_prompts=0,parallel=jit", **{"data.data_dir": data_dir}
    )

  part = train.train_and_evaluate(cfg(), str(tmp_path), stop_after_steps=13)
  assert part == {"stopped_at_step": 13}
  res = train.train_and_evaluate(cfg(), str(tmp_path))
  assert res["step"] == 26 and res["prompts_per_layer"] == [0, 0, 0]


def test_prompts_initialised_from_the_backbones_tokens(data_dir):
  c = tiny_config(**{"data.data_dir": data_dir, "prompt.init": "tokens"})
  c.prompt.init_images = 4
  s = build.setup(c)
  params = vit.merge_head(s.frozen, s.state.trainable["head"])
  pools = build.token_pools(s.model, params, s.train, c)
  for k, p in s.state.trainable["prompts"].items():
    pool = np.asarray(pools[k])
    assert pool.shape[0] == 4 * (c.data.image_size // s.model.patch_size) ** 2
    for row in np.asarray(p):
      assert np.isclose(pool, row, atol=1e-6).all(axis=1).any()


def test_head_init_vpt_or_zeros_and_a_bad_value_is_named():
  c = tiny_config()
  model = build.build_model(c)
  _, head = build.load_backbone(c, model)
  # VPT's init: a random kernel and the 1%-prior bias.
  assert np.asarray(head["kernel"]).std() > 0
  np.testing.assert_allclose(head["bias"], vit.HEAD_BIAS_INIT, rtol=1e-6)
  c.model.head_init = "zeros"
  _, head = build.load_backbone(c, model)
  assert not np.asarray(head["kernel"]).any()
  assert not np.asarray(head["bias"]).any()
  c.model.head_init = "xavier"
  with pytest.raises(ValueError, match="head_init.*'xavier'"):
    build.load_backbone(c, model)


def test_prelogit_standardization_is_exact_and_exports_a_raw_head(
  tmp_path, data_dir
):
  c = tiny_config(
    "epochs=2,batch_size=64",
    **{
      "data.data_dir": data_dir,
      "data.train_split": "train[:128]",
      "model.prelogit_norm": "standardize",
    },
  )
  c.model.prelogit_norm_images = 100  # crosses an eval batch (64)
  s = build.setup(c)
  mean, std = s.prelogit_stats
  assert mean.shape == std.shape == (s.model.hidden_size,)
  # The folded backbone standardises the first 100 training images' features.
  batch = next(
    pipeline.eval_batches(
      s.train, batch_size=100, normalization=c.data.normalize
    )
  )
  head = s.state.trainable["head"]

  def feats(backbone):
    return np.asarray(
      s.model.apply(
        {"params": vit.merge_head(backbone, head)},
        jnp.asarray(batch["image"]),
        None,
        return_features=True,
      )[1]
    )

  f = feats(s.frozen)
  np.testing.assert_allclose(f.mean(0), 0.0, atol=1e-3)
  np.testing.assert_allclose(f.std(0), 1.0, atol=1e-3)
  np.testing.assert_allclose(
    (feats(s.checkpoint_backbone) - mean) / std, f, atol=1e-3
  )
  # A head on standardised features is the same map as its raw form.
  h = {
    "kernel": jax.random.normal(jax.random.key(0), head["kernel"].shape),
    "bias": jax.random.normal(jax.random.key(1), head["bias"].shape),
  }
  raw = build.head_to_raw(h, mean, std)
  x = jnp.asarray(batch["image"][:8])
  np.testing.assert_allclose(
    s.model.apply({"params": vit.merge_head(s.frozen, h)}, x, None),
    s.model.apply(
      {"params": vit.merge_head(s.checkpoint_backbone, raw)}, x, None
    ),
    rtol=1e-4,
    atol=1e-4,
  )
  back = build.head_from_raw(raw, mean, std)
  for k in h:
    np.testing.assert_allclose(back[k], h[k], rtol=1e-4, atol=1e-4)
  # The export is for the checkpoint's backbone: loaded beside it, it
  # reproduces the run's evaluation.
  res = train.train_and_evaluate(c, str(tmp_path))
  backbone, _ = build.load_backbone(c, s.model)
  p, head, _ = pr.load_prompts(tmp_path / "prompts.npz", backbone=backbone)

  def evaluate(setup, trainable):
    state = steps.create_train_state(trainable, setup.optimizer)
    return runner.Runner("jit", setup).evaluate(state, setup.eval, c)

  pristine = evaluate(
    dataclasses.replace(s, frozen=backbone), {"prompts": p, "head": head}
  )
  assert pristine["accuracy"] == res["eval_accuracy"]
  np.testing.assert_allclose(pristine["loss"], res["eval_loss"], rtol=1e-4)
  # Restarting from the export (as PC's fine-tuning does) converts its head
  # back: the same evaluation on the standardised backbone.
  s2 = build.setup(c, init_trainable={"prompts": p, "head": head})
  again = evaluate(s2, s2.state.trainable)
  assert again["accuracy"] == pristine["accuracy"]
  np.testing.assert_allclose(again["loss"], pristine["loss"], rtol=1e-4)
  c.model.prelogit_norm = "whiten"
  with pytest.raises(config_util.ConfigError, match="prelogit_norm='whiten'"):
    build.setup(c)
