"""The run report: one self-contained HTML page with the run's plots and critique traces.

`write_report(run_dir)` reads the run directory (cai/report/data.py), draws the plots as inline SVG
(cai/report/plots.py) and renders the page (cai/report/html.py): every script, style and plot is
inside the file and its Content-Security-Policy forbids loading anything, so it opens offline and
can be mailed. `cai run` writes `RUN/report.html` when it finishes (and again after later stages);
`cai report` writes it on demand:

    cai report runs/quickstart                  # runs/quickstart/report.html
    cai report runs/quickstart -o report.html
"""

from __future__ import annotations

from pathlib import Path

from cai.report.data import ReportError, load_run

__all__ = ["FILE", "ReportError", "render", "write_report"]

FILE = "report.html"


def render(run_dir: str | Path) -> str:
    """The report of the run in `run_dir` as an HTML document."""
    from cai.report import html

    return html.page(load_run(run_dir))


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of the run in `run_dir` to `out` (default `run_dir/report.html`) atomically,
    and return its path. Raises ReportError when `run_dir` is not a run directory."""
    from cai.rundir import atomic_write

    text = render(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / FILE
    atomic_write(path, text)
    return path
