"""Exported tasks (ONNX, StableHLO) give vptpc's JAX logits; bad inputs fail.

On the embedded backbone (fractal-Ti/4, 32 px) with a condensed-like task:
ragged prompt counts per layer, one layer with none.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from vptpc import assets, checkpoint, export, export_formats
from vptpc import prompts as pr
from vptpc.data import preprocessing
from vptpc.models import vit

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")

MODEL = assets.DEFAULT_MODEL
COUNTS = (3, 0, 2, 1, 4, 2)
CLASSES = 7
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def backbone():
  model = vit.create_model(MODEL)
  template = jax.eval_shape(
    lambda: vit.init_params(model, jax.random.key(0), 32)
  )
  return checkpoint.load_pretrained(assets.path(), template)


@pytest.fixture(scope="module")
def task(backbone, tmp_path_factory):
  """A condensed task's prompts.npz and vptpc's JAX logits on 3 images."""
  p = pr.init_prompts(
    jax.random.key(1),
    num_prompts=COUNTS,
    hidden_size=128,
    patch_size=4,
    num_layers=6,
  )
  # Scaled up so the prompts move the logits well beyond the tolerance.
  p = jax.tree_util.tree_map(lambda a: a * 10, p)
  rng = np.random.default_rng(0)
  head = {
    "kernel": rng.normal(size=(128, CLASSES)).astype(np.float32),
    "bias": rng.normal(size=(CLASSES,)).astype(np.float32),
  }
  path = tmp_path_factory.mktemp("task") / "prompts.npz"
  pr.save_prompts(path, p, head, backbone=backbone, metadata={"model": MODEL})
  images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  # The reference: the host pipeline's normalisation and the plain
  # full-token forward, as training and evaluation run it.
  model = vit.create_model(MODEL, num_classes=CLASSES)
  apply = jax.jit(model.apply)
  params = {"params": vit.merge_head(backbone, head)}
  want = {
    mode: np.asarray(apply(params, preprocessing.normalize(images, mode), p))
    for mode in ("minus1_1", "imagenet")
  }
  return {"path": str(path), "images": images, "want": want, "head": head}


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_normalization_is_the_pipelines():
  x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  for mode in preprocessing.NORMALIZATIONS:
    scale, shift = export.normalization(mode)
    got = x.astype(np.float32) * scale + shift
    np.testing.assert_array_equal(got, preprocessing.normalize(x, mode))


def test_moved_names_warn_and_resolve():
  for name, new in (
    ("to_onnx", export_formats),
    ("load_stablehlo", export_formats),
    ("IMAGENET_MEAN", preprocessing),
  ):
    with pytest.warns(DeprecationWarning, match=f"{new.__name__}.{name}"):
      assert getattr(export, name) is getattr(new, name)
  with pytest.raises(AttributeError, match="no_such_name"):
    export.no_such_name  # noqa: B018


@pytest.fixture(scope="module")
def onnx_kv(task, tmp_path_factory):
  """The task exported as ONNX on the key/value graph (checked)."""
  d = tmp_path_factory.mktemp("onnx_kv")
  info = export.export_task(task["path"], d / "task.onnx")
  return d / "task.onnx", info


def test_onnx_kv_graph_matches_jax_and_records_metadata(task, onnx_kv):
  out, info = onnx_kv
  assert info["check"]["max_abs_diff"] <= 1e-4
  sess = export_formats.onnx_session(out)
  (inp,) = sess.get_inputs()
  assert inp.name == "images" and inp.type == "tensor(uint8)"
  assert isinstance(inp.shape[0], str)  # the batch is dynamic
  for idx in ([0, 1, 2], [1]):
    got = sess.run(None, {"images": task["images"][idx]})[0]
    assert got.shape == (len(idx), CLASSES)
    assert _max_diff(got, task["want"]["minus1_1"][idx]) <= 1e-4
  meta = export_formats.read_metadata(out)
  assert meta["prompts_per_layer"] == list(COUNTS)
  assert meta["graph"] == "kv" and meta["model"] == MODEL
  assert meta["vptpc_version"] == export._versions("onnx")["vptpc"]
  assert meta["normalize"] == "minus1_1" and meta["image_size"] == 32
  saved = pr.load_prompts(task["path"])[2]
  assert meta["backbone_fingerprint"] == saved["backbone"]["fingerprint"]
  assert os.listdir(out.parent) == ["task.onnx"]  # no temporary left


def test_onnx_full_graph_float_input_and_imagenet(
  task, onnx_kv, tmp_path, capsys
):
  out = tmp_path / "full.onnx"
  args = [
    f"--prompts={task['path']}",
    f"--output={out}",
    "--graph=full",
    "--input_dtype=float32",
    "--normalize=imagenet",
    "--no-check",  # checked here
  ]
  assert export.main(args) == 0
  assert json.loads(capsys.readouterr().out)["graph"] == "full"
  sess = export_formats.onnx_session(out)
  assert sess.get_inputs()[0].type == "tensor(float)"
  got = sess.run(None, {"images": task["images"].astype(np.float32)})[0]
  assert _max_diff(got, task["want"]["imagenet"]) <= 1e-4
  # The naive graph bakes the prompt tokens (k, D); the key/value graph
  # bakes each layer's projected keys and values (k, heads, D / heads).
  import onnx

  def shapes(path):
    return {tuple(t.dims) for t in onnx.load(path).graph.initializer}

  kv = onnx_kv[0]
  assert (4, 128) in shapes(out) and (4, 4, 32) not in shapes(out)
  assert (4, 4, 32) in shapes(kv) and (4, 128) not in shapes(kv)


def test_stablehlo_reloads_without_vptpc(task, tmp_path):
  out = tmp_path / "task.stablehlo"
  info = export.export_task(task["path"], out, graph="kv")
  assert info["check"]["max_abs_diff"] <= 1e-4
  np.save(tmp_path / "images.npy", task["images"])
  # The module docstring's loader, in a process where vptpc cannot import.
  script = textwrap.dedent(
    f"""
    import sys
    sys.modules["vptpc"] = None
    import json, zipfile, jax, numpy as np
    with zipfile.ZipFile({str(out)!r}) as z:
      exp = jax.export.deserialize(bytearray(z.read("model.jaxexport")))
      meta = json.loads(z.read("metadata.json"))
    images = np.load({str(tmp_path / "images.npy")!r})
    np.save({str(tmp_path / "logits.npy")!r}, np.asarray(exp.call(images)))
    print(json.dumps(meta["prompts_per_layer"]))
    """
  )
  r = subprocess.run(
    [sys.executable, "-c", script],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout.strip().splitlines()[-1]) == list(COUNTS)
  got = np.load(tmp_path / "logits.npy")
  assert _max_diff(got, task["want"]["minus1_1"]) <= 1e-4
  # vptpc's own loader; the full-token graph reloads and matches too.
  full = tmp_path / "full.stablehlo"
  export.export_task(task["path"], full, graph="full", check=False)
  exp, meta = export_formats.load_stablehlo(full)
  assert meta["graph"] == "full" and meta["format"] == "stablehlo"
  assert _max_diff(exp.call(task["images"]), task["want"]["minus1_1"]) <= 1e-4


def test_int8_quantized_onnx_is_close_not_exact(task, onnx_kv, tmp_path):
  out = tmp_path / "q.onnx"
  export.export_task(task["path"], out, quantize="int8", check=False)
  fp32 = onnx_kv[0]
  assert os.path.getsize(out) < os.path.getsize(fp32) / 2
  assert export_formats.read_metadata(out)["quantize"] == "int8"
  sess = export_formats.onnx_session(out)
  got = sess.run(None, {"images": task["images"]})[0]
  want = task["want"]["minus1_1"]
  # Not asserted equal: int8 moves the logits; they stay correlated.
  assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9
  assert _max_diff(got, want) > 0


@pytest.fixture(scope="module")
def foreign_prompts(backbone, task, tmp_path_factory):
  """The task's prompts saved as if trained on other backbone weights."""
  other = jax.tree_util.tree_map(np.array, backbone)
  other["cls"] = other["cls"] + 1.0
  prompts, head, _ = pr.load_prompts(task["path"])
  path = tmp_path_factory.mktemp("other") / "prompts.npz"
  pr.save_prompts(path, prompts, head, backbone=other)
  return str(path)


@pytest.mark.parametrize(
  "case, needle",
  [
    ("foreign", "fingerprint"),
    ("missing", "does not exist"),
    ("format_flag", "unsupported format 'tflite'"),
    ("format_suffix", "unsupported format"),
    ("not_prompts", "not a vptpc prompt file"),
    ("missing_backbone", "does not exist"),
    ("random_backbone", "trained on a randomly initialised backbone"),
    ("ambiguous_folder", "hold 2: condensed/prompts.npz, full/prompts.npz"),
    ("empty_folder", "is a folder without a prompts.npz (nor"),
    ("image_size", "--image_size=30 is not a multiple of fractal-Ti/4's patch"),
  ],
)
def test_bad_inputs_fail_with_one_line_and_no_file(
  case, needle, task, foreign_prompts, tmp_path, capsys
):
  out_dir = tmp_path / "out"
  prompts, output, extra = task["path"], out_dir / "task.onnx", []
  if case == "foreign":
    prompts = foreign_prompts
  elif case == "missing":
    prompts = str(tmp_path / "nope.npz")
  elif case == "format_flag":
    extra = ["--format=tflite"]
  elif case == "format_suffix":
    output = out_dir / "task.tflite"
  elif case == "not_prompts":
    prompts = str(tmp_path / "weights.npz")
    np.savez(prompts, w=np.zeros(3))
  elif case == "missing_backbone":
    extra = [f"--backbone={tmp_path / 'nope_backbone.npz'}"]
  elif case == "random_backbone":
    # A run of configs/tiny.py: its config.json names no checkpoint.
    run = tmp_path / "run"
    run.mkdir()
    prompts = str(run / "prompts.npz")
    shutil.copy(task["path"], run / "prompts.npz")
    (run / "config.json").write_text(
      json.dumps({"model": {"name": "tiny32", "checkpoint_path": ""}})
    )
  elif case == "ambiguous_folder":
    prompts = str(tmp_path / "pc")
    for stage in ("full", "condensed"):
      (tmp_path / "pc" / stage).mkdir(parents=True)
      (tmp_path / "pc" / stage / "prompts.npz").write_bytes(b"")
  elif case == "empty_folder":
    prompts = str(tmp_path)
  elif case == "image_size":
    extra = ["--image_size=30"]
  code = export.main([f"--prompts={prompts}", f"--output={output}", *extra])
  err = capsys.readouterr().err
  assert code == 2
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
  assert needle in err
  assert "check_fingerprint=False" not in err  # the CLI names its flag
  assert not out_dir.exists()


def test_format_names_are_case_insensitive():
  assert export_formats.format_of("task.bin", "ONNX") == "onnx"
  assert export_formats.format_of("task.bin", " StableHLO") == "stablehlo"
  assert export_formats.format_of("TASK.ONNX", None) == "onnx"
  with pytest.raises(export_formats.ExportError, match="'TFLITE'"):
    export_formats.format_of("task.onnx", "TFLITE")


def test_a_run_folder_stands_for_its_prompts_file(task, tmp_path):
  run = os.path.dirname(task["path"])
  assert pr.find_prompt_file(run) == task["path"]
  assert pr.find_prompt_file(task["path"]) == task["path"]
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "prompts.npz").write_bytes(b"")
  # One file below the top is still the user's choice (a condensation
  # that has not finished yet would otherwise export the uncondensed one).
  with pytest.raises(pr.PromptFileError, match="hold 1: full/prompts.npz"):
    pr.find_prompt_file(tmp_path)


def test_a_long_list_in_an_error_becomes_a_count_and_examples():
  keys = "\n".join(f"  Transformer/encoderblock_{i}/x (128)" for i in range(40))
  e = ValueError(
    f"'b.npz' does not fit the model:\nunexpected:\n{keys}\nCheck."
  )
  assert export._one_line(e) == (  # noqa: SLF001
    "'b.npz' does not fit the model; unexpected (40): "
    "Transformer/encoderblock_0/x (128), Transformer/encoderblock_1/x (128) "
    "and 38 more; Check."
  )


def test_help_explains_itself():
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run(
    [sys.executable, "-m", "vptpc.export", "--help"],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
    cwd=REPO,
    env=env,
  )
  assert r.returncode == 0, r.stderr
  for word in ("--prompts", "--graph", "key/value", "stablehlo", "onnx"):
    assert word in r.stdout


def test_a_failed_check_leaves_no_file_and_keeps_the_old_one(
  task, tmp_path, capsys
):
  # ONNX logits differ from JAX's by float rounding (> 0), so a zero
  # tolerance fails the check after the artifact was written to its
  # temporary name: it must vanish and the existing file must survive.
  out = tmp_path / "keep" / "task.onnx"
  out.parent.mkdir()
  out.write_bytes(b"old")
  args = [f"--prompts={task['path']}", f"--output={out}", "--tolerance=0"]
  assert export.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "differ from vptpc's JAX logits" in err
  assert os.listdir(out.parent) == ["task.onnx"] and out.read_bytes() == b"old"
  fresh = tmp_path / "new" / "deeper" / "task.onnx"
  assert (
    export.main(
      [f"--prompts={task['path']}", f"--output={fresh}", "--tolerance=0"]
    )
    == 2
  )
  assert not (tmp_path / "new").exists()
