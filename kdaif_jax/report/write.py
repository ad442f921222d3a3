"""Entry points of the SAFE report: ``write_report`` (the sections in order, then the
pages) and ``main`` (the command line, ``python -m kdaif_jax.report``)."""

from __future__ import annotations

import argparse
import os

from kdaif_jax.report import cost, explain, sections
from kdaif_jax.report.render import render_html, render_markdown
from kdaif_jax.report.workdir import Context, baseline_differences

# In report order; each appends its blocks to the Context (the Missing list comes last).
_SECTIONS = (
  sections.overview,
  sections.accuracy,
  explain.explainability,
  sections.fairness,
  cost.sustainability,
)


def write_report(workdir: str, baseline: str | None = None, out_dir: str | None = None) -> dict:
  """Writes the SAFE report of ``workdir`` (see the ``kdaif_jax.report`` docstring).

  Args:
    workdir: a run's folder (complete, partial, or copied from elsewhere).
    baseline: optional plain-KD workdir to compare with (curves, accuracy, cost).
    out_dir: where to write; default ``WORKDIR/report``.

  Returns:
    dict: ``report_md``, ``report_html`` (paths), ``figures`` ({file name: path}),
    ``missing`` (list of {file, problem, disabled}), ``numbers`` (headline values:
    ECEs, detection metrics, compression ratio, FLOPs, influence share, ...).

  Raises:
    FileNotFoundError: ``workdir`` or ``baseline`` is not a folder (anything
      missing inside them is reported, not raised).
    ValueError: the baseline ran another experiment (its data, student or
      schedule differ: ``baseline_differences``), so its numbers do not compare.
  """
  for path, name in ((workdir, "workdir"), (baseline, "baseline")):
    if path is not None and not os.path.isdir(path):
      raise FileNotFoundError(f"{name} {path!r} is not a folder")
  out_dir = out_dir or os.path.join(workdir, "report")
  c = Context(workdir, baseline, out_dir)
  diff = baseline_differences(c.config, c.base_config)
  if diff:
    more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
    raise ValueError(
      f"baseline {baseline!r} ran another experiment ({', '.join(diff[:3])}{more}); "
      "allowed: a plain-KD run of the same data, student and schedule"
    )
  os.makedirs(out_dir, exist_ok=True)
  for section in _SECTIONS:
    try:
      section(c)
    except Exception as err:  # noqa: BLE001 - one broken section must not cost the rest
      c.add("p", f"This section failed: {type(err).__name__}: {err}")
      c.files.note(
        "(report)",
        f"{section.__name__} failed: {type(err).__name__}: {err}",
        f"the {section.__name__} section",
      )
  sections.missing(c)
  md = os.path.join(out_dir, "report.md")
  with open(md, "w", encoding="utf-8") as f:
    f.write(render_markdown(c.blocks))
  page = os.path.join(out_dir, "report.html")
  with open(page, "w", encoding="utf-8") as f:
    f.write(render_html(c.blocks, out_dir, f"SAFE report: {workdir}"))
  return {
    "report_md": md,
    "report_html": page,
    "figures": c.figures,
    "missing": c.missing,
    "numbers": c.numbers,
  }


def main(argv: list[str] | None = None) -> int:
  """The command line: ``python -m kdaif_jax.report WORKDIR [--baseline DIR] [--out DIR]``.

  Args:
    argv: the arguments (default ``sys.argv[1:]``).

  Returns:
    0; prints the pages written and one line per missing file. A WORKDIR or
    baseline that is not a folder, or a baseline of another experiment, exits
    with argparse's usage error (status 2).
  """
  parser = argparse.ArgumentParser(
    prog="python -m kdaif_jax.report",
    description=("Write the SAFE report (report.md, report.html, PNGs) of a kdaif_jax workdir."),
  )
  parser.add_argument("workdir")
  parser.add_argument("--baseline", help="a plain-KD workdir to compare with")
  parser.add_argument("--out", help="output folder (default WORKDIR/report)")
  args = parser.parse_args(argv)
  try:
    out = write_report(args.workdir, args.baseline, args.out)
  except (FileNotFoundError, ValueError) as err:
    parser.error(str(err))
  print(f"wrote {out['report_md']} and {out['report_html']} ({len(out['figures'])} figures)")
  for w in out["numbers"].get("warnings") or []:
    print(f"warning: {w}")
  for m in out["missing"]:
    print(f"missing: {m['file']}: {m['problem']} (disabled: {m['disabled']})")
  return 0
