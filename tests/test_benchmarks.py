"""Every benchmark script still runs: its --help, then a tiny run, in-process.

The measurements themselves take minutes to hours; these dry runs use the
scripts' own small-size arguments (tiny models, a few images, one timed
call) so that a change in the library that breaks a script fails here, not
on the next machine that runs it. Scripts with tests of their own are
listed in `TESTED_ELSEWHERE`; every file in ``benchmarks/`` is one or the
other.
"""

import ast
import importlib.util
import json
import os
import re
import sys
import types

import numpy as np
import pytest

# Compile-bound: XLA's optimisations double the compiles and change nothing
# a dry run checks.
pytestmark = pytest.mark.usefixtures("fast_compiles")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)  # the scripts import their `table` helper

# Script -> the test file that runs it (or, for helpers, why none does).
TESTED_ELSEWHERE = {
  "backbone_parity.py": "test_timm_variants.py",
  "cv_recipe.py": "test_minivtab.py",
  "device_check.sh": "test_device_check.py",
  "e2e_bench.py": "test_bench_tools.py",
  "fault_sweep.py": "test_faults.py",
  "gpu_ablation.py": "test_device_check.py",
  "gpu_table.py": "test_bench_tools.py",
  "vpt_bench.py": "test_device_check.py",
  # Needs torch and timm; its outputs, tests/data/timm_*, are what
  # test_timm_parity.py and test_timm_variants.py read.
  "make_timm_reference.py": "test_timm_parity.py",
  # The PyTorch peers need torch: below, their flags are checked against
  # what the GPU script and vpt_bench pass, and a CPU smoke run where
  # torch is installed.
  "torch_peer.py": "test_benchmarks.py",
  "torch_vpt_ref.py": "test_benchmarks.py",
  "table.py": "imported by the other scripts",
}


def _module(name: str) -> types.ModuleType:
  path = os.path.join(BENCH, name)
  spec = importlib.util.spec_from_file_location(f"bench_{name[:-3]}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _run(name: str, args: list[str], monkeypatch, capsys) -> str:
  """``main()`` of ``benchmarks/<name>`` with ``args``; its stdout."""
  mod = _module(name)
  monkeypatch.setattr(sys, "argv", [name, *args])
  mod.main()
  return capsys.readouterr().out


def test_every_script_is_tested_and_documented():
  scripts = sorted(f for f in os.listdir(BENCH) if f.endswith((".py", ".sh")))
  untested = set(scripts) - set(DRY_RUNS) - set(TESTED_ELSEWHERE)
  assert not untested, f"benchmark scripts without a test: {untested}"
  assert not (set(DRY_RUNS) | set(TESTED_ELSEWHERE)) - set(scripts)
  for name in TESTED_ELSEWHERE.values():
    if name.endswith(".py"):
      assert os.path.exists(os.path.join(ROOT, "tests", name)), name
  for name in scripts:
    with open(os.path.join(BENCH, name)) as f:
      text = f.read()
    if name.endswith(".py"):
      doc = ast.get_docstring(ast.parse(text)) or ""
    else:  # the header comment after the shebang
      doc = "".join(
        line[1:] for line in text.splitlines()[1:] if line.startswith("#")
      )
    assert doc, f"{name}: no module docstring"
    if name != "table.py":  # a helper, not a measurement
      assert len(doc.split()) >= 20, f"{name}: says too little"
      assert name in doc, f"{name}: its docstring shows no command"


def _probe_arrays(path, rng):
  from vptpc.data import minivtab

  arrays = {}
  n = 40  # train and test alike: one batch shape, one compile
  for task in minivtab.TASKS:
    for split in ("train", "test"):
      arrays[f"{task}/{split}/images"] = rng.integers(
        0, 256, (n, 32, 32, 3), np.uint8
      )
      arrays[f"{task}/{split}/labels"] = np.arange(n) % 3
  np.savez(path, **arrays)


def _int8_run(tmp_path, rng):
  """A finished run's folder (prompts.npz, config.json) on a tiny ViT."""
  import jax
  from PIL import Image

  from vptpc import config_util, npz_checkpoint
  from vptpc import prompts as pr
  from vptpc.models import vit

  data = tmp_path / "data"
  (data / "images").mkdir(parents=True)
  lines = []
  for i in range(12):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
      data / "images" / f"{i}.png"
    )
    lines.append(f"images/{i}.png {i % 3}")
  (data / "test.txt").write_text("\n".join(lines) + "\n")
  model = vit.create_model("testing")
  shapes = jax.eval_shape(lambda: vit.init_params(model, jax.random.key(0), 32))
  backbone = jax.tree.map(
    lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32),
    vit.split_head(shapes)[0],
  )
  npz_checkpoint.save_npz(tmp_path / "backbone.npz", backbone)
  c = config_util.base_config()
  c.model.name = "testing"
  c.model.checkpoint_path = str(tmp_path / "backbone.npz")
  c.data.source = "folder"
  c.data.folder = str(data)
  c.data.eval_split = "test"
  c.data.num_classes = 3
  c.data.image_size = 32
  c.data.normalize = "minus1_1"
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(c.to_json())
  p = pr.init_prompts(
    jax.random.key(1),
    num_prompts=2,
    hidden_size=model.hidden_size,
    patch_size=model.patch_size,
    num_layers=model.num_layers,
  )
  head = {
    "kernel": rng.normal(size=(model.hidden_size, 3)).astype(np.float32),
    "bias": np.zeros(3, np.float32),
  }
  pr.save_prompts(
    run / "prompts.npz",
    p,
    head,
    backbone=backbone,
    metadata={"model": "testing"},
  )
  return run / "prompts.npz"


def _fake_torch(monkeypatch):
  """A stand-in for torch: the wrapper only sets the default device."""
  torch = types.ModuleType("torch")
  torch.set_default_device = lambda device: None
  torch.cuda = types.SimpleNamespace(
    synchronize=lambda: None, get_device_name=lambda: "none"
  )
  monkeypatch.setitem(sys.modules, "torch", torch)


# Script -> a function of (tmp_path, monkeypatch) returning its tiny run's
# arguments, and what its output must contain.
def _args_export_int8(tmp_path, monkeypatch):
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")
  path = _int8_run(tmp_path, np.random.default_rng(0))
  out = tmp_path / "int8.json"
  return [f"--prompts={path}", "--latency_iters=1", f"--json={out}"], (
    "ONNX int8 (dynamic)"
  )


def _args_export_latency(tmp_path, monkeypatch):
  runtimes = "jax"
  if importlib.util.find_spec("jax2onnx") and importlib.util.find_spec(
    "onnxruntime"
  ):
    runtimes = "onnx,jax"
  args = ["--model=testing", "--image_size=32", "--prompts=2"]
  args += ["--graphs=kv", "--condensed_keep=0", "--batches=1", "--iters=1"]
  args += ["--classes=3", f"--runtimes={runtimes}"]
  return args, "| 2 | kv |"


def _args_preflight_cost(tmp_path, monkeypatch):
  return ["--model=testing"], '"with_fingerprint_s"'


def _args_probe(tmp_path, monkeypatch):
  arrays = tmp_path / "arrays.npz"
  _probe_arrays(arrays, np.random.default_rng(0))
  return [f"--arrays={arrays}", "--prompts=1"], "| digits |"


def _args_profile(tmp_path, monkeypatch):
  args = [f"--out={tmp_path}", "--model=testing", "--image_size=32"]
  args += ["--batch=2", "--prompts=2", "--iters=1", "--matmul_n=64"]
  return args, "whole jitted forward"


def _args_torch_ref(tmp_path, monkeypatch):
  _fake_torch(monkeypatch)
  ref = tmp_path / "ref.py"
  ref.write_text(
    "import json, sys\n"
    "print(json.dumps({'img_s': 1.0, 'argv': sys.argv[1:]}))\n"
  )
  return [str(ref), "--device=cpu", "--", "--prompts", "3"], '"device": "cpu"'


def _args_serve(tmp_path, monkeypatch):
  args = ["--model=testing", "--tasks=2", "--batch=4", "--iters=1"]
  return args, "mixed / per-task throughput"


def _args_sweep(tmp_path, monkeypatch):
  args = ["--smoke", "--lrs=1", "--wds=0", "--task=digits"]
  return [*args, f"--data_dir={tmp_path / 'tfds'}"], "vmapped grid"


def _args_calibration(tmp_path, monkeypatch):
  run = _int8_run(tmp_path, np.random.default_rng(0)).parent
  return [f"--runs={run}", "--noise=4", f"--out={tmp_path / 'c.json'}"], (
    "| ece |"
  )


DRY_RUNS = {
  "calibration.py": _args_calibration,
  "export_int8_accuracy.py": _args_export_int8,
  "export_latency.py": _args_export_latency,
  "preflight_prompt_cost.py": _args_preflight_cost,
  "probe_features.py": _args_probe,
  "profile_forward.py": _args_profile,
  "run_torch_ref.py": _args_torch_ref,
  "serve_bench.py": _args_serve,
  "sweep_bench.py": _args_sweep,
}


@pytest.mark.parametrize("name", sorted(DRY_RUNS))
def test_script_helps_and_runs_tiny(name, tmp_path, monkeypatch, capsys):
  if name == "run_torch_ref.py":
    _fake_torch(monkeypatch)  # imported after the arguments are parsed
  with pytest.raises(SystemExit) as e:
    _run(name, ["--help"], monkeypatch, capsys)
  assert e.value.code == 0
  assert "usage:" in capsys.readouterr().out
  args, want = DRY_RUNS[name](tmp_path, monkeypatch)
  out = _run(name, args, monkeypatch, capsys)
  assert want in out, out[-2000:]
  if name == "run_torch_ref.py":
    rec = json.loads(out.splitlines()[-1])
    assert rec["argv"] == ["--prompts", "3"]
  if name == "profile_forward.py":
    assert (tmp_path / "profile.json").exists()
  if name == "export_int8_accuracy.py":
    rows = json.loads((tmp_path / "int8.json").read_text())["rows"]
    fp32 = next(r for r in rows if r["model"] == "ONNX fp32")
    assert fp32["agree_fp32_onnx"] == 1.0


def _options(script: str) -> set[str]:
  """The ``--flags`` a script's argparse parser defines (read, not run)."""
  with open(os.path.join(BENCH, script)) as f:
    tree = ast.parse(f.read())
  return {
    arg.value
    for node in ast.walk(tree)
    if isinstance(node, ast.Call)
    and getattr(node.func, "attr", "") == "add_argument"
    for arg in node.args
    if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")
  }


def test_the_pytorch_peers_take_the_flags_the_benchmarks_pass():
  with open(os.path.join(BENCH, "device_check.sh")) as f:
    lines = f.read().splitlines()
  passed = set()
  for i, line in enumerate(lines):
    if '"$peer"' in line:
      call = line
      while call.endswith("\\"):
        i += 1
        call += lines[i]
      passed |= set(re.findall(r"(--[a-z_]+)", call))
  assert {"--batch", "--prompts", "--compile"} <= passed
  assert passed <= _options("torch_peer.py")
  with open(os.path.join(BENCH, "vpt_bench.py")) as f:
    bench = f.read()
  call = bench.split("def torch_reference", 1)[1].split("subprocess.run")[0]
  flags = set(re.findall(r'"(--[a-z_]+)"', call))
  assert flags == {"--prompts", "--batch", "--steps"}
  assert flags <= _options("torch_vpt_ref.py")


@pytest.mark.parametrize(
  "script,args",
  [
    ("torch_peer.py", ["--device=cpu", "--size=32", "--depth=2"]),
    ("torch_vpt_ref.py", []),
  ],
)
def test_the_pytorch_peers_run_on_a_cpu_where_torch_is_installed(script, args):
  pytest.importorskip("torch")
  import subprocess

  extra = ["--batch=2", "--prompts=2", "--steps=1", "--warmup=1"]
  if script == "torch_vpt_ref.py":
    extra = ["--batch", "1", "--prompts", "2", "--steps", "1"]
    extra += ["--warmup", "1", "--classes", "3"]
  out = subprocess.run(
    [sys.executable, os.path.join(BENCH, script), *args, *extra],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(r) for r in out.stdout.splitlines() if r.startswith("{")]
  assert rows and all("error" not in r for r in rows), rows


def test_calibration_error_is_zero_when_calibrated_and_one_when_sure_and_wrong():
  ece = _module("calibration.py").ece
  labels = np.array([0, 1, 0, 1])
  # Confidence 0.5 on each, half of them right: calibrated.
  half = np.full((4, 2), 0.5)
  assert ece(half, labels) == pytest.approx(0.0)
  # Certain and always wrong.
  wrong = np.eye(2)[1 - labels]
  assert ece(wrong, labels) == pytest.approx(1.0)
  # Certain and right.
  assert ece(np.eye(2)[labels], labels) == pytest.approx(0.0)
