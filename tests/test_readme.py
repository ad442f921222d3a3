"""The README's library example runs as written and its scores are per-example;
the README and docs/ are self-contained: no reference outside the repository,
and every relative link resolves to a file (and heading) that exists."""

import glob
import os
import re
import unicodedata

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


# Markdown links and images: [text](target) / ![alt](target), target without spaces.
LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FORBIDDEN = ("../shared", "METHOD.md")


def _markdown_files() -> list[str]:
  docs = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*"), recursive=True))
  return [os.path.join(ROOT, "README.md")] + [p for p in docs if os.path.isfile(p)]


def _strip_code(text: str) -> str:
  """The text without fenced code blocks and inline code (links there are not links)."""
  text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  return re.sub(r"`[^`\n]*`", "", text)


def _github_anchor(heading: str) -> str:
  """The id GitHub gives a heading: lower case, punctuation dropped, spaces -> '-'."""
  text = heading.strip().lower().replace("`", "")
  kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in ("L", "N"))
  return kept.replace(" ", "-")


def _anchors(path: str) -> set[str]:
  with open(path, encoding="utf-8") as f:
    text = re.sub(r"^```.*?^```", "", f.read(), flags=re.S | re.M)
  return {_github_anchor(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def test_docs_exist_and_readme_links_them():
  with open(os.path.join(ROOT, "docs", "method.md"), encoding="utf-8") as f:
    method = f.read()
  # The code's docstrings cite "docs/method.md §N": sections 1-8 keep their numbers.
  numbered = re.findall(r"^## (\d+)\. ", method, re.M)
  assert numbered == [str(n) for n in range(1, 9)], numbered
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    assert "](docs/method.md" in f.read()


def test_readme_and_docs_reference_nothing_outside_the_repository():
  for path in _markdown_files():
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    for needle in FORBIDDEN:
      assert needle not in text, f"{os.path.relpath(path, ROOT)} mentions {needle!r}"


def test_relative_links_in_readme_and_docs_resolve():
  checked = 0
  for path in _markdown_files():
    if not path.endswith(".md"):
      continue
    with open(path, encoding="utf-8") as f:
      text = f.read()
    here = os.path.relpath(path, ROOT)
    for target in LINK_RE.findall(_strip_code(text)):
      if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
        continue
      file_part, _, anchor = target.partition("#")
      dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
      assert os.path.realpath(dest).startswith(os.path.realpath(ROOT) + os.sep), (
        f"{here}: {target} leaves the repository"
      )
      assert os.path.exists(dest), f"{here}: link {target} points to a missing file"
      if anchor and dest.endswith(".md"):
        assert anchor in _anchors(dest), f"{here}: link {target}: no heading #{anchor}"
      checked += 1
  assert checked > 0
