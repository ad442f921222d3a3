"""The notebooks run top to bottom (small sizes) and are committed clean.

Each notebook is executed with nbclient in a kernel that runs this very Python
(a kernelspec written to a temporary JUPYTER_PATH), with KDAIF_NOTEBOOK_SMALL=1
and a temporary working directory. Its last cell prints one line
``KDAIF_RESULT {json}`` with the headline numbers, checked here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NAMES = ("quickstart", "influence_explorer")
KERNEL = "kdaif-notebook-test"
RESULT_PREFIX = "KDAIF_RESULT "
CELL_TIMEOUT_S = 300


def _path(name: str) -> str:
  return os.path.join(NOTEBOOK_DIR, f"{name}.ipynb")


def _load_builder():
  spec = importlib.util.spec_from_file_location("_build", os.path.join(NOTEBOOK_DIR, "_build.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs_and_matches_builder(name):
  nb = nbformat.read(_path(name), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, "no code cells"
  for cell in code:
    assert cell.outputs == [], f"{cell.id} has outputs"
    assert cell.execution_count is None, f"{cell.id} has an execution count"
  # The .ipynb is generated: notebooks/_build.py must give exactly the committed file.
  assert nb == _load_builder().build_notebook(name), (
    f"{name}.ipynb differs from notebooks/_build.py; edit _build.py and rerun it"
  )
  first = code[0].source
  assert "google.colab" in first and "KDAIF_SOURCE" in first
  assert any('os.environ.get("KDAIF_NOTEBOOK_SMALL") == "1"' in c.source for c in code)


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """A kernelspec that starts this interpreter, found through JUPYTER_PATH."""
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "kdaif_jax test kernel",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("KDAIF_NOTEBOOK_SMALL", "1")
  work = tmp_path / "work"
  work.mkdir()
  monkeypatch.setenv("TMPDIR", str(work))  # the notebooks' tempfile folders land here
  return work


def _execute(name: str, cwd) -> tuple[nbformat.NotebookNode, dict]:
  from nbclient import NotebookClient

  nb = nbformat.read(_path(name), as_version=4)
  client = NotebookClient(
    nb,
    kernel_name=KERNEL,
    timeout=CELL_TIMEOUT_S,
    startup_timeout=120,
    resources={"metadata": {"path": str(cwd)}},
  )
  client.execute()  # raises CellExecutionError on the first failing cell
  for cell in nb.cells:
    if cell.cell_type == "code":
      errors = [o for o in cell.outputs if o.output_type == "error"]
      assert not errors, f"{name} cell {cell.id}: {errors}"
  lines = [
    line
    for cell in nb.cells
    if cell.cell_type == "code"
    for o in cell.outputs
    if o.output_type == "stream" and o.name == "stdout"
    for line in o.text.splitlines()
    if line.startswith(RESULT_PREFIX)
  ]
  assert len(lines) == 1, f"{name}: expected one {RESULT_PREFIX.strip()} line, got {lines}"
  result = json.loads(lines[0][len(RESULT_PREFIX) :])
  assert result["small"] is True
  assert os.path.realpath(result["python"]) == os.path.realpath(sys.executable)
  return nb, result


def _count_outputs(nb, mime: str) -> int:
  return sum(
    mime in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs
  )


@pytest.mark.slow
def test_quickstart_runs(kernel_env):
  nb, r = _execute("quickstart", kernel_env)
  for run in ("kdaif", "plain_kd"):
    for net in ("teacher", "student"):
      assert 0.0 <= r[run][net] <= 1.0, (run, net, r[run][net])
  assert r["kdaif"]["teacher"] == r["plain_kd"]["teacher"]  # plain KD reused the teacher
  assert r["kdaif"]["auroc"] is not None and 0.0 <= r["kdaif"]["auroc"] <= 1.0
  assert os.path.isfile(r["report_md"])
  assert {"training_curves.png", "weights.png", "most_harmful.png"} <= set(r["figures"])
  assert _count_outputs(nb, "image/png") >= len(r["figures"])  # shown inline
  assert _count_outputs(nb, "text/markdown") >= 2  # the comparison and harmful tables
  assert r["harmful_rows"] == 15
  assert str(kernel_env) in r["report_md"]  # everything written under the temp folder


@pytest.mark.slow
def test_influence_explorer_runs(kernel_env):
  nb, r = _execute("influence_explorer", kernel_env)
  p1, p2, p3 = r["part1"], r["part2"], r["part3"]
  assert p1["cg_residual"] < 1e-4 and p1["cg_iterations"] >= 1
  assert p1["jvp_vs_explicit"] < 1e-3 and p1["jvp_vs_batch_influence"] < 1e-3
  assert p1["gauss_newton_quadratic_form"] >= 0.0
  assert 0 < p2["num_flipped"] < p2["num_train"]
  assert p2["cg_residual"] < 1e-3
  assert p2["auroc"] > 0.7, p2  # measured 0.89 at the small size
  assert p2["top_k"]["10"] >= 0.5, p2
  assert p3["dtype"] == "float64" and p3["loo_count"] >= 10
  assert p3["max_grad_norm"] < 1e-8
  assert p3["pearson_r"] > 0.9, p3  # measured 0.98
  assert _count_outputs(nb, "image/png") >= 3  # histogram, harmful images, LOO scatter
