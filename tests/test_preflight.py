"""Bad inputs: every problem named at once, one error line, nothing written.

Also the rules of a workdir run again: a changed config (safe and unsafe
keys), ``config.overwrite``, a finished run, and serving's bad lines.
"""

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from test_train import ROOT, tiny_config

from vptpc import config_util, preflight, progress, protocol, rundir, train
from vptpc.data import sources


def _listing(path):
  """Every file under ``path`` with its size (what a run may have written)."""
  out = {}
  for d, _, fs in os.walk(path):
    for f in fs:
      p = os.path.join(d, f)
      out[os.path.relpath(p, path)] = os.path.getsize(p)
  return out


def test_every_problem_is_listed_at_once_and_nothing_is_written(tmp_path):
  rand = tmp_path / "random.npz"
  rand.write_bytes(np.random.default_rng(0).bytes(4096))
  afile = tmp_path / "afile"
  afile.write_text("x")
  c = tiny_config("parallel=pmap,batch_size=12")
  c.data.data_dir = str(tmp_path / "tfds")
  c.data.name = "dtd:3.0.1"  # not prepared there
  c.model.checkpoint_path = str(rand)
  c.warmup_epochs = 99  # >= total_epochs
  c.data.normalize = "zscore"
  before = _listing(tmp_path)
  t0 = time.perf_counter()
  with pytest.raises(preflight.PreflightError) as e:
    protocol.run(c, str(afile))
  took = time.perf_counter() - t0
  msgs = e.value.problems
  text = "\n".join(msgs)
  assert "config.warmup_epochs=99" in text
  assert "config.data.normalize='zscore'" in text
  assert "--workdir=" in text and "existing file" in text
  assert "not a .npz archive" in text and "allow_pickle" not in text
  assert "python -m vptpc.prepare --tasks=dtd" in text
  # The batch is checked only once the config is valid; here it is not.
  assert len(msgs) == 5, text
  assert _listing(tmp_path) == before  # no data generated, nothing written
  assert not (tmp_path / "tfds").exists()
  assert took < 3


def test_workdir_checkpoint_and_device_checks_name_the_fix(tmp_path):
  assert "cannot be created" in preflight.workdir_problems("/proc/x/y")[0]
  (tmp_path / "f").write_text("")
  assert "is a file" in preflight.workdir_problems(str(tmp_path / "f/run"))[0]
  assert preflight.workdir_problems(str(tmp_path / "new" / "run")) == []
  assert not (tmp_path / "new").exists()  # the probe leaves nothing
  got = preflight.checkpoint_problems(str(tmp_path / "nope.npz"))
  assert "does not exist" in got[0] and "checkpoint_path=PATH" in got[0]
  np.savez(tmp_path / "other.npz", a=np.zeros(3))
  got = preflight.checkpoint_problems(str(tmp_path / "other.npz"))
  assert "not a vit_jax ViT checkpoint" in got[0]
  c = tiny_config("parallel=pmap,batch_size=12")
  c.eval_batch_size = 20
  got = preflight.device_problems(c)
  assert len(got) == 2 and "--config.parallel=jit" in got[0]
  assert "config.eval_batch_size=20" in got[1]


def test_a_corrupt_prompts_file_of_a_condensation_run_is_named(tmp_path):
  c = tiny_config()
  c.condense.keep = 0.5
  full = tmp_path / "w" / "full"
  full.mkdir(parents=True)
  (full / "results.json").write_text("{}")
  (full / "prompts.npz").write_bytes(b"garbage")
  stages = preflight.stages(c, str(tmp_path / "w"))
  assert [s.kind for s in stages] == ["pc", "stage", "stage"]
  got = preflight.stage_problems(stages[1])
  assert len(got) == 1 and "prompts.npz" in got[0]
  assert "--config.overwrite=True" in got[0]


def _folder(root, labels, n_missing=0):
  (root / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  lines = []
  for i, lab in enumerate(labels):
    rel = f"images/{i}.png"
    if i >= n_missing:
      Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(
        root / rel
      )
    lines.append(f"{rel} {lab}")
  for s in ("train", "test"):
    (root / f"{s}.txt").write_text("\n".join(lines) + "\n")


def test_folder_dataset_labels_missing_and_corrupt_images(tmp_path):
  root = tmp_path / "f"
  _folder(root, [0, 1, 2, 5], n_missing=1)
  p, w = sources.folder_problems(str(root), "train", 4)
  assert len(p) == 2 and "outside [0, 4)" in p[0] and "images/3.png" in p[0]
  assert "1 image(s)" in p[1] and "images/0.png" in p[1]
  p, w = sources.folder_problems(str(root), "train", 10)
  assert "num_classes=10" in w[0] and "classes 6..9" in w[0]
  # A corrupt image is named by the preflight's header check; with the
  # check off it fails when the (cached) split is decoded. Either way
  # before the workdir exists.
  good = tmp_path / "g"
  _folder(good, [0, 1, 2, 3])
  (good / "images" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  c = tiny_config("parallel=jit")
  c.data.source, c.data.folder = "folder", str(good)
  c.data.train_split, c.data.eval_split = "train", "test"
  with pytest.raises(preflight.PreflightError) as e:
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert len(e.value.problems) == 2  # train.txt and test.txt list it
  assert "images/2.png" in e.value.problems[0]
  assert "verify_images=off" in e.value.problems[0]
  c.data.verify_images = "off"
  with pytest.raises(sources.DataError, match="2.png"):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_non_finite_and_negative_floats_are_named_up_front(tmp_path):
  # A NaN passes every range check written as a comparison; the optimiser
  # used to reject it after the data was generated, with a traceback.
  c = tiny_config(
    **{
      "base_lr": float("nan"),
      "weight_decay": -1e-4,
      "prompt.lr_scale": float("inf"),
      "condense.keep": float("nan"),
      "protocol.wds": (0.0, float("-inf")),
    }
  )
  c.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(preflight.PreflightError) as e:
    preflight.check(c, str(tmp_path / "w"))
  assert sorted(e.value.problems) == [
    "config.base_lr must be a finite number, got nan.",
    "config.condense.keep must be in [0, 1] (0 = off), got nan.",
    "config.prompt.lr_scale must be a finite number, got inf.",
    "config.protocol.wds must hold finite numbers, got (0.0, -inf).",
    "config.weight_decay must be >= 0, got -0.0001.",
  ]
  assert os.listdir(tmp_path) == []
  c = tiny_config(**{"condense.ft_base_lr": -0.5, "data.num_classes": 1})
  got = config_util.problems(c)
  assert len(got) == 2 and "ft_base_lr must be >= 0, or -1" in got[1]
  assert got[0].startswith("config.data.num_classes must be >= 2")
  assert (
    config_util.problems(tiny_config(**{"condense.ft_base_lr": -1.0})) == []
  )


def test_an_image_size_off_the_patch_grid_names_the_sizes_that_fit():
  for name, patch, want in (
    ("fractal-Ti/4", "patch size 4", "use 28 or 32"),
    ("tiny32", "patch size 8", "use 24 or 32"),
    ("swin-testing", "patch 2", "use 24 or 32"),
  ):
    c = tiny_config(**{"model.name": name, "data.image_size": 30})
    got = [p for p in config_util.problems(c) if "image_size" in p]
    assert len(got) == 1, got
    assert "image_size=30" in got[0] and patch in got[0] and want in got[0]


def test_cli_refuses_a_nan_learning_rate_at_once(tmp_path):
  out, took = _cli(
    [
      "--config=configs/tiny.py",
      "--config.base_lr=nan",
      f"--config.data.data_dir={tmp_path}/tfds",
      f"--workdir={tmp_path}/w",
    ]
  )
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
  errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
  assert errors == ["error: config.base_lr must be a finite number, got nan."]
  assert os.listdir(tmp_path) == []  # no data generated, no workdir


def test_changed_keys_are_classified():
  a = tiny_config().to_dict()
  b = tiny_config("base_lr=0.5,epochs=7").to_dict()
  b["log_every_steps"] = 3
  b["data"]["eval_split"] = "test[:10]"
  b["protocol"]["lrs"] = [1.0]
  b["condense"]["keep"] = 0.5
  b["overwrite"] = True
  unsafe, safe = config_util.changed_keys(
    a, b, ignore=config_util.STAGE_IGNORES
  )
  assert [k for k, *_ in unsafe] == ["base_lr", "total_epochs"]
  assert [k for k, *_ in safe] == ["data.eval_split", "log_every_steps"]
  unsafe, _ = config_util.changed_keys(a, b, ignore=("protocol",))
  assert "condense.keep" in [k for k, *_ in unsafe]
  # Standardised pre-logits are summed in eval batches: unsafe then.
  b = dict(a, eval_batch_size=32)
  b["model"] = dict(a["model"], prelogit_norm="standardize")
  a["model"] = b["model"]
  assert config_util.changed_keys(a, b)[0][0][0] == "eval_batch_size"


def test_rerun_rules_changed_safe_finished_and_overwrite(
  tmp_path, data_dir, capsys
):
  def cfg(**kw):
    c = tiny_config("epochs=1,parallel=jit", **{"data.data_dir": data_dir})
    c.data.train_split, c.data.eval_split = "train[:64]", "test[:64]"
    for k, v in kw.items():
      c[k] = v
    return c

  w = str(tmp_path / "w")
  first = train.train_and_evaluate(cfg(), w)
  capsys.readouterr()
  # Unchanged: one line and the table, nothing recomputed or rewritten.
  before = _listing(w)
  again = train.train_and_evaluate(cfg(), w)
  out = capsys.readouterr().out
  assert again == first and "already finished at step 1" in out
  assert "eval top-1" in out and _listing(w) == before
  # Unsafe: each key named with both values, nothing touched.
  with pytest.raises(preflight.PreflightError) as e:
    train.train_and_evaluate(cfg(base_lr=0.5, seed=7), w)
  msg = str(e.value)
  assert "config.base_lr: 1.0 -> 0.5" in msg and "config.seed: 42 -> 7" in msg
  assert "--config.overwrite=True" in msg and _listing(w) == before
  # Safe: accepted and re-evaluated (same numbers).
  res = train.train_and_evaluate(cfg(log_every_steps=1), w)
  assert res["eval_accuracy"] == first["eval_accuracy"]
  assert (
    json.loads(open(os.path.join(w, "config.json")).read())["log_every_steps"]
    == 1
  )
  # Overwrite: the old run moves to a timestamped sibling, not deleted.
  res = train.train_and_evaluate(cfg(base_lr=0.5, overwrite=True), w)
  out = capsys.readouterr().out
  moved = [d for d in os.listdir(tmp_path) if d.startswith("w.old-")]
  assert len(moved) == 1 and moved[0] in out
  old = tmp_path / moved[0]
  assert json.loads((old / "config.json").read_text())["base_lr"] == 1.0
  assert (old / "prompts.npz").exists() and (old / "checkpoints").exists()
  assert (
    json.loads(open(os.path.join(w, "config.json")).read())["base_lr"] == 0.5
  )
  assert not os.path.exists(os.path.join(w, rundir.LOCK))


def _cli(args, **kw):
  t0 = time.perf_counter()
  out = subprocess.run(
    [sys.executable, "-m", "vptpc.main", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    **kw,
  )
  return out, time.perf_counter() - t0


def test_cli_bad_inputs_one_error_line_each_exit_2_nothing_written(
  tmp_path, data_dir
):
  # The config file: named, before JAX is even imported.
  out, took = _cli(["--config=configs/nope.py", f"--workdir={tmp_path}/a"])
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.startswith("error: config file 'configs/nope.py'")
  # Weights and data missing, the workdir a file: three lines, one run.
  rand = tmp_path / "random.npz"
  rand.write_bytes(np.random.default_rng(0).bytes(4096))
  (tmp_path / "file").write_text("")
  out, took = _cli(
    [
      f"--config=configs/vtab.py:task=dtd,data_dir={tmp_path}/tfds,"
      f"checkpoint={rand}",
      f"--workdir={tmp_path}/file",
    ]
  )
  errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert len(errors) == 3, out.stderr
  assert "allow_pickle" not in out.stderr
  assert sorted(os.listdir(tmp_path)) == ["file", "random.npz"]
  # A non-finite loss: one line (checkpoints kept), no traceback. The data
  # is generated here: said so, no "Downloading", the directory named, and
  # no start-up noise (TPU probing, OpenCV advice).
  fresh = tmp_path / "tfds_new"
  out, _ = _cli(
    [
      "--config=configs/tiny.py:epochs=2,base_lr=1e30,parallel=jit",
      f"--config.data.data_dir={fresh}",
      "--config.data.train_split=train[:64]",
      "--config.warmup_epochs=0",
      "--config.log_every_steps=1",
      f"--workdir={tmp_path}/nan",
    ]
  )
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
  assert "error: Non-finite training loss" in out.stderr
  both = out.stdout + out.stderr
  assert f"Generating vptpc_toy locally into {fresh}" in out.stdout
  assert "Downloading" not in both and "downloaded and prepared" not in both
  assert f"Data: vptpc_toy in {fresh} (config.data.data_dir)" in out.stderr
  assert "OpenCV" not in both and "backend 'tpu'" not in both
  assert "\r" not in both  # no progress bar redrawn into a pipe


def test_progress_lines_replace_the_bar_off_a_terminal():
  buf = io.StringIO()
  bar = progress.ProgressLines(total=100, initial=0, out=buf)
  bar.set_postfix(loss="1.0000")
  for _ in range(100):
    bar.update(1)
  lines = buf.getvalue().splitlines()
  # The first step and the last; a line per tenth only 30 s apart.
  assert lines == [
    "step 1/100 (1%) loss 1.0000",
    "step 100/100 (100%) loss 1.0000",
  ]
  assert not progress.interactive()  # pytest captures: not a terminal


def test_serve_reports_a_bad_line_and_carries_on(
  tiny_params, tmp_path, monkeypatch, capsys
):
  from test_serve import _tasks

  from vptpc import npz_checkpoint, serve
  from vptpc import prompts as pr
  from vptpc.models import vit

  frozen, _ = vit.split_head(tiny_params)
  npz_checkpoint.save_npz(tmp_path / "backbone.npz", frozen)
  pr.save_prompts(tmp_path / "a.npz", *_tasks(frozen)["a"], backbone=frozen)
  img = tmp_path / "ok.png"
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
  (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  lines = [
    f"a {img}",
    f"a {tmp_path / 'missing.png'}",
    f"a {tmp_path / 'bad.png'}",
    "just-one-field",
    f"zzz {img}",
    f"a {img}",
  ]
  monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
  rc = serve.main(
    [
      f"--task=a={tmp_path / 'a.npz'}",
      f"--backbone={tmp_path / 'backbone.npz'}",
      "--model=tiny32",
      "--batch_size=2",
    ]
  )
  cap = capsys.readouterr()
  assert rc == 2
  assert [json.loads(x)["image"] for x in cap.out.splitlines()] == [
    str(img)
  ] * 2
  errs = cap.err.splitlines()
  assert len(errs) == 4 and all(e.startswith("error: stdin line") for e in errs)
  assert "no such file" in errs[0] and "cannot read image" in errs[1]
  assert "expected 'task path'" in errs[2] and "unknown task 'zzz'" in errs[3]


def _tiny32_npz(path, seed):
  """A random-weight ``tiny32`` backbone saved as a vit_jax .npz."""
  import jax

  from vptpc import npz_checkpoint
  from vptpc.models import vit

  model = vit.create_model("tiny32", num_classes=None)
  shapes = jax.eval_shape(
    lambda r: vit.init_params(model, r, 32), jax.random.key(0)
  )
  rng = np.random.default_rng(seed)  # numpy: no init to compile
  backbone = jax.tree.map(
    lambda s: rng.standard_normal(s.shape).astype(np.float32),
    vit.split_head(shapes)[0],
  )
  npz_checkpoint.save_npz(path, backbone)
  return backbone


def test_a_prompts_file_of_another_backbone_is_refused_up_front(tmp_path):
  import jax

  from vptpc import prompts

  a = _tiny32_npz(tmp_path / "a.npz", 0)
  _tiny32_npz(tmp_path / "b.npz", 1)  # same shapes, other weights
  p = prompts.init_prompts(
    jax.random.key(0), num_prompts=2, hidden_size=32, patch_size=4, num_layers=3
  )
  head = {"kernel": np.zeros((32, 4), np.float32), "bias": np.zeros(4)}
  c = tiny_config()
  c.condense.keep = 0.5
  full = tmp_path / "w" / "full"
  full.mkdir(parents=True)
  (full / "results.json").write_text("{}")
  prompts.save_prompts(full / "prompts.npz", p, head, backbone=a)
  stage = preflight.stages(c, str(tmp_path / "w"))[1]
  c.model.checkpoint_path = str(tmp_path / "a.npz")
  assert preflight.stage_problems(stage) == []
  c.model.checkpoint_path = str(tmp_path / "b.npz")
  got = preflight.stage_problems(stage)
  assert len(got) == 1 and "same shapes, other weights" in got[0], got
  assert "fingerprint" in got[0] and "b.npz" in got[0]
  assert "prompts.npz" in got[0] and "--config.overwrite=True" in got[0]
  # Another width and depth: named from the headers, no weights read.
  c.model.checkpoint_path = os.path.join(
    ROOT, "vptpc", "assets", "fractal_vit_ti4.npz"
  )
  t0 = time.perf_counter()
  got = preflight.stage_problems(stage)
  took = time.perf_counter() - t0
  text = "\n".join(got)
  assert len(got) == 3, text  # width, depth, head
  assert "hidden_size 32 in the file vs 128" in text
  assert "num_layers 3 in the file vs 6" in text
  assert took < 0.5, took
  # A timm Swin .safetensors: its per-block widths, from the JSON header.
  c.model.checkpoint_path = os.path.join(
    ROOT, "tests", "data", "timm_swin_tiny.safetensors"
  )
  got = preflight.stage_problems(stage)
  assert any("widths[0] 32 in the file vs 8" in g for g in got), got
  # Without a checkpoint: the config's model shapes (jax.eval_shape).
  c.model.checkpoint_path = ""
  c.model.name = "ViT-Ti_16"
  got = preflight.stage_problems(stage)
  assert any("hidden_size 32 in the file vs 192" in g for g in got), got
  # Through protocol.run: refused before anything is written.
  c.model.name = "tiny32"
  c.model.checkpoint_path = str(tmp_path / "b.npz")
  before = _listing(tmp_path)
  with pytest.raises(preflight.PreflightError, match="other weights"):
    protocol.run(c, str(tmp_path / "w"))
  assert _listing(tmp_path) == before


def _jpeg_folder(root, n_train, n_test):
  """A folder dataset of 48-px JPEGs, 4 classes; returns the test paths."""
  (root / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for split, n in (("train", n_train), ("test", n_test)):
    lines = []
    for i in range(n):
      rel = f"images/{split}{i}.jpg"
      Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(
        root / rel
      )
      lines.append(f"{rel} {i % 4}")
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_a_corrupt_image_in_an_uncached_split_keeps_the_run_resumable(tmp_path):
  root = tmp_path / "f"
  _jpeg_folder(root, 64, 128)
  victim = root / "images" / "test5.jpg"
  good = victim.read_bytes()
  victim.write_bytes(good[: len(good) // 2])  # truncated scan data
  # PIL's header check cannot see truncated JPEG data; a full decode can.
  assert sources.image_problems(str(root), "test", "header") == []
  got = sources.image_problems(str(root), "test", "decode")
  assert len(got) == 1 and "images/test5.jpg" in got[0]
  c = tiny_config("parallel=jit,epochs=1")
  c.data.source, c.data.folder = "folder", str(root)
  c.data.train_split, c.data.eval_split = "train", "test"
  # 64 training images (196 KB at 32 px) are cached, 128 test images are
  # not: the test split is decoded per batch, as a VTAB test set would be.
  c.data.cache_max_gb = 300_000 / 2**30
  c.data.on_device = "never"
  w = tmp_path / "w"
  with pytest.raises(sources.DataError) as e:
    train.train_and_evaluate(c, str(w))
  msg = str(e.value)
  assert "test5.jpg" in msg and "Found mid-run" in msg
  assert "latest: step 1" in msg and "resume" in msg
  assert (w / "checkpoints" / "1").is_dir() and not (
    w / "results.json"
  ).exists()
  victim.write_bytes(good)
  res = train.train_and_evaluate(c, str(w))  # resumes: evaluation only
  assert res["step"] == 1 and res["eval_examples"] == 128
