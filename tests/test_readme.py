"""The README's library example runs as written and its scores are per-example."""

import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_library_example_runs():
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README has no python example"
  scope = {}
  exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
  assert scope["I"].shape == (32,)
  assert np.all(np.isfinite(np.asarray(scope["I"])))
  assert int(scope["info"].iterations) >= 1
  for a, b in zip(jax_leaves(scope["hv"]), jax_leaves(scope["params"])):
    assert a.shape == b.shape


def jax_leaves(tree):
  import jax

  return jax.tree.leaves(tree)
