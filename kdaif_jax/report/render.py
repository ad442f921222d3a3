"""Text of the SAFE report: number formatting, and its blocks as Markdown and as HTML.

A report is a list of blocks: ("h", level, text), ("p", text), ("table", header, rows),
("ul", items), ("img", file name, alt). Text may hold `code` and **bold** spans.
"""

from __future__ import annotations

import base64
import html
import os
import re
from typing import Any

import numpy as np

# --------------------------------------------------------------------------
# Numbers to text ("n/a" / "unknown" for a missing or non-finite value)
# --------------------------------------------------------------------------


def num(v: Any) -> float:
  """``float(v)``, or NaN when ``v`` is None or not a number."""
  try:
    return float(v)
  except (TypeError, ValueError):
    return float("nan")


def pct(v: float | None) -> str:
  """A share as a percentage with two decimals ("12.34%"), or "n/a"."""
  return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.2f}%"


def fmt(v: float | None, spec: str = ".3f") -> str:
  """``format(v, spec)``, or "n/a"."""
  return "n/a" if v is None or not np.isfinite(v) else format(v, spec)


def thousands(v: int | None) -> str:
  """An integer with thousands separators ("1,234"), or "n/a" for None or 0."""
  return f"{int(v):,}" if v else "n/a"


def si(v: float | None) -> str:
  """Three significant digits with a k/M/G suffix ("1.23M"), or "unknown"."""
  if v is None or not np.isfinite(v):
    return "unknown"
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(v) >= scale:
      return f"{v / scale:.3g}{unit}"
  return f"{v:.3g}"


# --------------------------------------------------------------------------
# Blocks to pages
# --------------------------------------------------------------------------


def render_markdown(blocks: list[tuple]) -> str:
  """Markdown of the blocks; pictures linked by file name (they sit beside report.md).

  Args:
    blocks: the report's blocks (see the module docstring).

  Returns:
    The page, blocks separated by blank lines, ending in a newline.
  """
  out = []
  for b in blocks:
    if b[0] == "h":
      out.append("#" * b[1] + " " + b[2])
    elif b[0] == "p":
      out.append(b[1])
    elif b[0] == "ul":
      out.append("\n".join(f"- {item}" for item in b[1]))
    elif b[0] == "table":
      cells = lambda row: "| " + " | ".join(str(v).replace("|", "/") for v in row) + " |"
      out.append("\n".join([cells(b[1]), cells(["---"] * len(b[1]))] + [cells(r) for r in b[2]]))
    elif b[0] == "img":
      out.append(f"![{b[2]}]({b[1]})")
  return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
  """Escaped HTML with `code` and **bold** spans."""
  text = html.escape(str(text))
  text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
  return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


_CSS = (
  "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
  "line-height:1.45}table{border-collapse:collapse;margin:0.5em 0}"
  "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
  "img{max-width:100%}code{background:#f3f3f3;padding:0 3px}"
)


def render_html(blocks: list[tuple], folder: str, title: str) -> str:
  """One self-contained HTML page: every picture embedded as a base64 data URI.

  Args:
    blocks: the report's blocks (see the module docstring).
    folder: where the blocks' PNG files are.
    title: the page title.

  Returns:
    The page.
  """
  out = [
    f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
    f"</title><style>{_CSS}</style></head><body>"
  ]
  for b in blocks:
    if b[0] == "h":
      out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
    elif b[0] == "p":
      out.append(f"<p>{_inline(b[1])}</p>")
    elif b[0] == "ul":
      out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
    elif b[0] == "table":
      head = "".join(f"<th>{_inline(v)}</th>" for v in b[1])
      rows = "".join("<tr>" + "".join(f"<td>{_inline(v)}</td>" for v in r) + "</tr>" for r in b[2])
      out.append(f"<table><tr>{head}</tr>{rows}</table>")
    elif b[0] == "img":
      with open(os.path.join(folder, b[1]), "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
      out.append(f"<p><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'></p>")
  out.append("</body></html>")
  return "\n".join(out)
