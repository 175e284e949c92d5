"""Tests of vptpc.analysis: rank measures, attention capture, the commands."""

import json
import types

import jax
import numpy as np
import pytest
from conftest import IMAGE_SIZE, TINY

from vptpc import analysis
from vptpc import prompts as pr
from vptpc.models import vit


def test_rank_measures_on_known_matrices():
  rng = np.random.default_rng(0)
  u, v = rng.normal(size=(2, 20, 3))
  low = u @ v.T  # rank 3
  assert analysis.effective_rank(low, 1e-6) == 3
  assert analysis.effective_rank(np.eye(7), 0.5) == 7
  # Singular values 10, 1, 0.1: energy 0.9 needs the first only.
  d = np.diag([10.0, 1.0, 0.1])
  assert analysis.energy_rank(d, 0.9) == 1
  assert analysis.energy_rank(d, 0.999) == 2
  assert analysis.effective_rank(d, 0.05) == 2
  batch = np.stack([low, np.eye(20)])
  np.testing.assert_array_equal(analysis.effective_rank(batch, 1e-6), [3, 20])


def test_growth_fit_tells_log_from_linear():
  n = np.array([10, 20, 50, 100, 200, 500])
  log_fit = analysis.fit_growth(n, 3 + 2 * np.log(n))
  assert log_fit["log_r2"] > 0.999 and log_fit["log_b"] == pytest.approx(2)
  lin_fit = analysis.fit_growth(n, 0.5 * n)
  assert lin_fit["linear_r2"] > 0.999 and lin_fit["log_r2"] < 0.95


def test_attention_capture_is_square_stochastic_and_inert(tiny_params):
  model = vit.VisionTransformer(**TINY, num_classes=None, kv_only=True)
  frozen, _ = vit.split_head(tiny_params)
  prompts = pr.init_prompts(
    jax.random.key(1),
    num_prompts=(2, 0, 5),
    hidden_size=32,
    patch_size=8,
    num_layers=3,
  )
  x = np.random.default_rng(0).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3))
  ws = analysis.attention_weights(model, frozen, x.astype(np.float32), prompts)
  n_img = (IMAGE_SIZE // 8) ** 2
  assert [w.shape for w in ws] == [
    (2, 2, 1 + k + n_img, 1 + k + n_img) for k in (2, 0, 5)
  ]
  for w in ws:
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
  # Asking for the weights does not change the features.
  full = model.clone(kv_only=False)
  plain = full.apply({"params": frozen}, x, prompts)
  with_w, _ = full.apply(
    {"params": frozen}, x, prompts, mutable=["intermediates"]
  )
  np.testing.assert_allclose(plain, with_w, rtol=1e-6, atol=1e-6)
  rows = analysis.rank_table(
    model, frozen, x.astype(np.float32), [0, 3], patch_size=8
  )
  means = [r for r in rows if r["layer"] == "mean"]
  assert [r["n_tokens"] for r in means] == [1 + n_img, 4 + n_img]
  assert [r["prompts"] for r in means] == ["none", "random_init"]
  assert all(1 <= r["rank_rel"] <= r["n_tokens"] for r in rows)


def _flags(tmp_path, **kw):
  d = dict(
    out=str(tmp_path / "out"),
    counts="0:2",
    seeds="42",
    pc_runs="",
    prompts_dir="",
    num_images=4,
    rel_tol=1e-2,
    energy=0.9,
    results="",
    config=None,
  )
  d.update(kw)
  return types.SimpleNamespace(**d)


def test_heatmap_command_writes_png_and_csv(tmp_path):
  res = {
    "scores": {"encoderblock_0": [0.1, 0.5], "encoderblock_1": [0.3, 0.0]},
    "kept_indices": {"encoderblock_0": [1], "encoderblock_1": [0]},
  }
  path = tmp_path / "results.json"
  path.write_text(json.dumps(res))
  out = analysis.run_command("heatmap", _flags(tmp_path, results=str(path)))
  assert out["rows"] == 4
  text = (tmp_path / "out" / "importance.csv").read_text().splitlines()
  assert text[0] == "layer,prompt,score,kept"
  assert "0,1,0.5,1" in text and "1,1,0.0,0" in text
  assert (tmp_path / "out" / "importance.png").stat().st_size > 1000
  path.write_text(json.dumps({"full": {}}))
  with pytest.raises(ValueError, match="scores"):
    analysis.run_command("heatmap", _flags(tmp_path, results=str(path)))
  with pytest.raises(FileNotFoundError, match="nope.json"):
    analysis.run_command("heatmap", _flags(tmp_path, results="nope.json"))


def test_curve_and_rank_commands_end_to_end(tmp_path, data_dir):
  from test_train import tiny_config

  c = tiny_config("epochs=1,parallel=jit")
  c.data.data_dir = data_dir
  f = _flags(tmp_path, config=c, counts="1:2")
  out = analysis.run_command("curve", f)
  assert [r["prompts_per_layer"] for r in out["rows"]] == [1.0, 2.0]
  assert all(0 <= r["accuracy"] <= 1 for r in out["rows"])
  assert (tmp_path / "out" / "accuracy_vs_prompts.png").exists()
  # rank reuses the curve's trained prompts where a count matches.
  f = _flags(
    tmp_path,
    config=c,
    counts="0:2:4",
    prompts_dir=str(tmp_path / "out" / "runs"),
  )
  out = analysis.run_command("rank", f)
  src = {r["num_prompts"]: r["prompts"] for r in out["rows"]}
  assert src == {0: "none", 2: "trained", 4: "random_init"}
  assert set(out["fits"]) == {"rank_rel", "rank_energy"}
  assert (tmp_path / "out" / "attention_rank.csv").exists()
  with pytest.raises(ValueError, match="counts"):
    analysis.run_command("rank", _flags(tmp_path, config=c, counts="-1"))
  with pytest.raises(ValueError, match="Unknown command"):
    analysis.run_command("plot", _flags(tmp_path, config=c))
