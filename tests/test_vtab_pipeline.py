"""Readers, preprocessing, prepare, protocol and the vtab config end to end."""

import importlib.util
import json
import os
import time
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from vptpc import prepare, protocol
from vptpc.data import decoding, pipeline, preprocessing, sources, vtab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vtab_config(arg):
  spec = importlib.util.spec_from_file_location(
    "vtab_cfg", os.path.join(ROOT, "configs", "vtab.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_resize_matches_tf_half_pixel_bilinear():
  x = np.array([[0.0, 1.0], [2.0, 3.0]])[..., None]
  got = preprocessing.resize_bilinear(x, 4, 4)[..., 0]
  # Samples at -0.25, 0.25, 0.75, 1.25 clamp to the border (TF2 resize).
  np.testing.assert_allclose(got[0], [0.0, 0.25, 0.75, 1.0])
  np.testing.assert_allclose(got[:, 0], [0.0, 0.5, 1.5, 2.0])
  rng = np.random.default_rng(0)
  img = rng.uniform(0, 255, size=(37, 23, 3)).astype(np.float32)
  for shape in ((64, 50), (16, 9)):  # up and down, no antialiasing
    want = jax.image.resize(img, shape + (3,), "bilinear", antialias=False)
    np.testing.assert_allclose(
      preprocessing.resize_bilinear(img, *shape), want, rtol=1e-4, atol=1e-3
    )


def test_bicubic_resize_matches_tf2_and_reaches_the_split():
  rng = np.random.default_rng(0)
  img = rng.uniform(0, 255, size=(37, 23, 3)).astype(np.float32)
  for shape in ((64, 50), (16, 9)):  # jax.image.resize is TF2's resize
    want = jax.image.resize(img, shape + (3,), "cubic", antialias=False)
    np.testing.assert_allclose(
      preprocessing.resize_bicubic(img, *shape), want, rtol=1e-4, atol=1e-3
    )
  u8 = img.astype(np.uint8)
  cubic = preprocessing.preprocess_image(u8, 16, interpolation="bicubic")
  linear = preprocessing.preprocess_image(u8, 16)
  assert (
    cubic.dtype == np.uint8
    and np.abs(cubic.astype(int) - linear.astype(int)).max() > 0
  )
  with pytest.raises(sources.DataError, match="interpolation must be one"):
    preprocessing.preprocess_image(u8, 16, interpolation="lanczos")


def _folder(tmp_path, splits=("train800", "test"), n=6, size=(20, 30)):
  root = tmp_path / "folder"
  (root / "images" / "a").mkdir(parents=True)
  rng = np.random.default_rng(0)
  lines = []
  for i in range(n):
    rel = f"images/a/{i}.png"
    arr = rng.integers(0, 255, size=size + (3,), dtype=np.uint8)
    Image.fromarray(arr).save(root / rel)
    lines.append(f"{rel} {i % 3}")
  for s in splits:
    (root / f"{s}.txt").write_text("\n".join(lines) + "\n")
  return root


def test_folder_reader_and_its_errors(tmp_path):
  root = _folder(tmp_path)
  s = pipeline.load_split(
    "dtd",
    "train800",
    image_size=16,
    source="folder",
    folder=str(root),
    num_classes=3,
  )
  assert s.images.shape == (6, 16, 16, 3)
  assert s.labels.tolist() == [0, 1, 2, 0, 1, 2]
  crop = pipeline.load_split(
    "dtd",
    "test",
    image_size=16,
    source="folder",
    folder=str(root),
    preprocess="crop",
  )
  assert crop.images.shape == (6, 16, 16, 3)
  with pytest.raises(sources.DataError, match="val200.txt"):
    pipeline.load_split(
      "dtd", "val200", image_size=16, source="folder", folder=str(root)
    )
  (root / "bad.txt").write_text("images/a/0.png\n")
  with pytest.raises(sources.DataError, match=r"bad.txt:1"):
    pipeline.load_split(
      "dtd", "bad", image_size=16, source="folder", folder=str(root)
    )
  (root / "gone.txt").write_text("images/nope.png 1\n")
  with pytest.raises(sources.DataError, match="nope.png"):
    pipeline.load_split(
      "dtd", "gone", image_size=16, source="folder", folder=str(root)
    )
  with pytest.raises(sources.DataError, match="does not exist"):
    pipeline.load_split(
      "dtd", "test", image_size=16, source="folder", folder=str(tmp_path / "x")
    )


def test_uncached_and_fgvc_splits(tmp_path):
  root = _folder(tmp_path, size=(40, 60))
  kw = dict(image_size=16, source="folder", folder=str(root))
  cached = pipeline.load_split("x", "train800", **kw)
  lazy = pipeline.load_split("x", "train800", cache_max_gb=0.0, **kw)
  assert lazy.images is None and len(lazy) == 6
  a = list(
    pipeline.eval_batches(cached, batch_size=4, normalization="imagenet")
  )
  b = list(pipeline.eval_batches(lazy, batch_size=4, normalization="imagenet"))
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["mask"], y["mask"])
  # FGVC: whole images cached, random crop + flip per (seed, epoch, step).
  tr = pipeline.load_split("x", "train800", preprocess="fgvc", train=True, **kw)
  assert tr.crop and tr.images[0].shape == (18, 27, 3)  # shorter side 16*8/7

  def epoch():
    return list(
      pipeline.train_batches(
        tr, batch_size=4, seed=1, epoch=0, normalization="minus1_1"
      )
    )

  e1, e2 = epoch(), epoch()
  assert e1[0]["image"].shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(e1[1]["image"], e2[1]["image"])
  ev = pipeline.load_split("x", "test", preprocess="fgvc", **kw)
  assert ev.images.shape == (6, 16, 16, 3)


def test_missing_data_fails_fast_with_the_step_to_take(tmp_path):
  t0 = time.perf_counter()
  with pytest.raises(sources.DataError) as e:
    sources.open_source("dtd:3.0.1", "train[:800]", str(tmp_path))
  msg = str(e.value)
  assert "dtd:3.0.1" in msg and "python -m vptpc.prepare --tasks=dtd" in msg
  with pytest.raises(sources.DataError) as e:
    sources.open_source("resisc45:3.0.0", "train[:800]", str(tmp_path))
  assert vtab.get_task("resisc45").manual in str(e.value)
  assert time.perf_counter() - t0 < 5
  # A tfrecord copy without TensorFlow: say so, and what to do.
  d = tmp_path / "dtd" / "3.0.1"
  d.mkdir(parents=True)
  (d / "dataset_info.json").write_text(json.dumps({"version": "3.0.1"}))
  if importlib.util.find_spec("tensorflow") is None:
    with pytest.raises(sources.DataError, match=r"tfrecord.*\[tf\]"):
      sources.open_source("dtd:3.0.1", "train[:800]", str(tmp_path))


def test_prepare_command(tmp_path, capsys, data_dir):
  assert prepare.expand("fgvc") == list(vtab.FGVC)
  with pytest.raises(ValueError, match="nope"):
    prepare.expand("dtd,nope")
  t0 = time.perf_counter()
  rc = prepare.main(
    ["--tasks=dtd,nabirds", f"--data_dir={tmp_path}", "--check"]
  )
  out = capsys.readouterr().out
  assert rc == 1 and time.perf_counter() - t0 < 5
  assert "dtd: not prepared" in out
  assert (
    "nabirds: MANUAL" in out
    and vtab.folder_root(str(tmp_path), "nabirds") in out
  )
  rc = prepare.main(["--tasks=resisc45", f"--data_dir={tmp_path}"])
  assert rc == 1 and "resisc45: MANUAL" in capsys.readouterr().out
  # A pinned version this TFDS cannot build is reported, not downloaded.
  rc = prepare.main(["--tasks=caltech101", f"--data_dir={tmp_path}"])
  out = capsys.readouterr().out
  assert rc == 1 and "caltech101: FAILED caltech101:3.0.1" in out
  assert "tfds_version" in out or "3.0.2" in out
  assert prepare.main([f"--data_dir={data_dir}", "--tasks=digits"]) == 0
  assert prepare.main(["--tasks=bogus"]) == 2


def _fake_final(path, task, accs):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "final.json"), "w") as f:
    json.dump(
      {
        "task": task,
        "mean": float(np.mean(accs)),
        "std": float(np.std(accs)),
        "seeds": [{"seed": s, "test": a} for s, a in enumerate(accs)],
        "base_lr": 1.0,
        "weight_decay": 1e-3,
        "num_prompts": 100,
        "normalize": "imagenet",
      },
      f,
    )


def test_report_from_two_fake_runs(tmp_path):
  _fake_final(tmp_path / "runs" / "eurosat", "eurosat", [0.96, 0.97])
  _fake_final(tmp_path / "runs" / "dtd", "dtd", [0.60, 0.70])
  md = protocol.write_report([str(tmp_path / "runs")], str(tmp_path / "rep"))
  assert "| natural | dtd | 65.00 ± 5.00 | 2 | 100 | 1 | 0.001 | 65.8 |" in md
  assert "| specialized | eurosat | 96.50 ± 0.50 |" in md
  assert "| mean of group means | 80.75 | 2/3 groups | – |" in md
  assert "| mean over tasks | 80.75 | 2/19 | – |" in md
  rows = (tmp_path / "rep" / "report.csv").read_text().splitlines()
  assert len(rows) == 3 and rows[0].startswith("benchmark,group,task")
  _fake_final(tmp_path / "runs" / "dtd2", "dtd", [0.5])
  with pytest.raises(ValueError, match="Two final runs"):
    protocol.write_report([str(tmp_path / "runs")], str(tmp_path / "rep"))
  with pytest.raises(FileNotFoundError, match="matches no final.json"):
    protocol.collect([str(tmp_path / "none*")])


def test_vtab_config_keys_and_errors():
  c = vtab_config("task=dsprites_loc,mode=tune")
  t = vtab.get_task("dsprites_loc")
  assert c.data.task == "dsprites_loc" and c.data.num_classes == 16
  assert c.protocol.tune_splits == (t.splits["train800"], t.splits["val200"])
  assert c.data.eval_split == t.splits["test"]
  assert c.prompt.num_prompts == t.num_prompts
  f = vtab_config("task=cub")
  assert f.data.preprocess == "fgvc" and 0.05 not in f.protocol.lrs
  assert vtab_config("task=cars").data.source == "folder"
  with pytest.raises(ValueError, match="nope"):
    vtab_config("task=nope")


def fake_prepared_eurosat(tmp_path):
  """A TFDS data_dir where eurosat looks prepared (reads are mocked)."""
  data_dir = tmp_path / "tfds"
  d = data_dir / "eurosat" / "rgb" / "2.0.0"
  d.mkdir(parents=True)
  (d / "dataset_info.json").write_text(
    json.dumps({"version": "2.0.0", "fileFormat": "array_record"})
  )
  return data_dir


def test_vtab_smoke_protocol_through_main_on_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  from absl import flags

  from vptpc import main as entry

  data_dir = fake_prepared_eurosat(tmp_path)
  work = tmp_path / "work"
  cfg = os.path.join(ROOT, "configs", "vtab.py")
  with tfds.testing.mock_data(num_examples=12):
    for mode in ("tune", "final"):
      entry._parse_flags(
        [
          "vptpc.main",
          f"--config={cfg}:task=eurosat,smoke,mode={mode},data_dir={data_dir}",
          f"--workdir={work}",
        ]
      )
      entry.main(["vptpc.main"])
  flags.FLAGS.unparse_flags()
  tune = json.loads((work / "tune.json").read_text())
  assert len(tune["grid"]) == 2 and tune["best"]["base_lr"] in (1.0, 0.1)
  final = json.loads((work / "final.json").read_text())
  assert [s["seed"] for s in final["seeds"]] == [42, 44]
  assert final["base_lr"] == tune["best"]["base_lr"]
  assert final["tuned_from"].endswith("tune.json")
  data = json.loads((work / "final" / "seed42" / "data.json").read_text())
  assert data["train"]["version"] == "2.0.0"
  md = protocol.write_report([str(work)], str(tmp_path / "rep"))
  assert "eurosat" in md


def test_a_run_with_missing_data_stops_in_seconds(tmp_path):
  import subprocess
  import sys

  t0 = time.perf_counter()
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "vptpc.main",
      f"--config=configs/vtab.py:task=dtd,smoke,data_dir={tmp_path}",
      f"--workdir={tmp_path / 'w'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert "python -m vptpc.prepare --tasks=dtd" in out.stderr
  assert "Traceback" not in out.stderr
  assert time.perf_counter() - t0 < 60  # interpreter + JAX start included


def test_normalize_matches_the_textbook_formulas():
  img = np.arange(256, dtype=np.uint8).reshape(1, 1, -1, 1).repeat(3, axis=-1)
  x = img.astype(np.float64) / 255.0
  want = (x - preprocessing.IMAGENET_MEAN) / preprocessing.IMAGENET_STD
  got = preprocessing.normalize(img, "imagenet")
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
    preprocessing.normalize(img, "minus1_1"), 2 * x - 1, atol=1e-6
  )
  with pytest.raises(sources.DataError, match="normalize must be one of"):
    preprocessing.normalize(img, "zscore")


def test_moved_names_warn_and_resolve():
  for name, new in (
    ("open_source", sources),
    ("default_data_dir", sources),
    ("normalize", preprocessing),
    ("IMAGENET_MEAN", preprocessing),
    ("default_example_fn", decoding),
  ):
    with pytest.warns(DeprecationWarning, match=f"{new.__name__}.{name}"):
      assert getattr(pipeline, name) is getattr(new, name)
  # The error load_split raises stays there, without a warning.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert pipeline.DataError is sources.DataError
  with pytest.raises(AttributeError, match="no_such_name"):
    pipeline.no_such_name  # noqa: B018
