"""A PNG screenshot of a run's report, as the README shows: the report rendered to a temporary
file (the run directory is not touched), opened in headless Chromium (Debian's `chromium`, driven
by playwright; its own browser download is never used) with the network off, and shot at 1280
pixels wide.

    python scripts/report_screenshot.py runs/quickstart docs/report.png
    python scripts/report_screenshot.py runs/quickstart shot.png --section evaluation --height 1100
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.add_argument("out", metavar="OUT.png", help="where to write the screenshot")
    p.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels (default 1280)")
    p.add_argument("--height", type=int, default=1000, help="viewport height, the shot's height (default 1000)")
    p.add_argument("--section", help="scroll to this section first: overview, evaluation, sl, feedback, pm, training, constitution-code")
    p.add_argument("--open-trace", type=int, metavar="N", help="expand the N-th trace of the trace browser (from 1)")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium", help="the browser binary")
    args = p.parse_args(argv)
    if not Path(args.chromium).is_file():
        print(f"error: no Chromium at {args.chromium}: apt-get install -y chromium, or pass --chromium", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from cai.report import ReportError, write_report

    with tempfile.TemporaryDirectory() as tmp:
        try:
            html = write_report(args.run, Path(tmp) / "report.html")
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=ARGS)
            try:
                tab = browser.new_context(offline=True, viewport={"width": args.width, "height": args.height}).new_page()
                tab.goto(html.resolve().as_uri())
                if args.open_trace:
                    tab.locator("#traces li.trace summary").nth(args.open_trace - 1).click()
                if args.section:
                    tab.locator(f"section#{args.section}").scroll_into_view_if_needed()
                    tab.evaluate(f"document.getElementById({args.section!r}).scrollIntoView()")
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                tab.screenshot(path=args.out)
            finally:
                browser.close()
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
