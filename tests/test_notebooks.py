"""Executes every notebook top to bottom in its SMOKE mode (CPU, offline)."""

import glob
import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_three_notebooks_with_stripped_outputs():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert names == {
    "quickstart.ipynb",
    "vtab_reproduction.ipynb",
    "condensation_analysis.ipynb",
  }
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source.startswith("SMOKE = True"), path
    for c in code:
      assert not c.get("outputs") and c.get("execution_count") is None, path
      # Work goes through the library, not the command line.
      assert "vptpc.main" not in c.source, path


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch, data_dir):
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)  # shares generated data
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # The kernel imports this checkout even where it is not pip-installed.
  pythonpath = os.environ.get("PYTHONPATH", "")
  monkeypatch.setenv(
    "PYTHONPATH", os.pathsep.join(filter(None, [ROOT, pythonpath]))
  )
  nb = nbformat.read(path, as_version=4)
  t0 = time.perf_counter()
  NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},
  ).execute()
  print(f"{os.path.basename(path)}: {time.perf_counter() - t0:.1f} s")
  assert (tmp_path / "runs" / "notebooks").is_dir()
