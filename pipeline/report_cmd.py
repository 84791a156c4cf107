"""`genloop report RUN_DIR [--out FILE]`: the run as one self-contained HTML page.

Plots are embedded as base64 PNGs and nothing is loaded from the network, so the page opens
offline. Works on an unfinished run: what is not there yet is listed as skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import UsageError, check_output


def register(subparsers) -> None:
    """Add the `report` sub-command to genloop's parser."""
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of a run",
        description="Write RUN_DIR/report.html: metrics, training-mix composition, curation "
        "funnel, token-category deltas and selection clusters per generation, the resolved "
        "config and the metrics table. Every image is embedded; the file opens offline.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (genloop run)")
    parser.add_argument(
        "--out", metavar="FILE", help="where to write (default RUN_DIR/report.html)"
    )
    parser.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.html_report import write_report

    run_dir = Path(args.run_dir)
    if args.out:
        check_output(args.out, "--out", file=True)
    try:
        path, report = write_report(run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    size = path.stat().st_size
    print(
        f"genloop: wrote {path} ({size / 1024:.0f} KiB, {len(report.sections)} sections, "
        f"{report.images} images)"
    )
    for note in report.notes:
        print(f"  skipped: {note}")
    return 0
