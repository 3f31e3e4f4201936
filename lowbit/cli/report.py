"""`lowbit report RUN_DIR`: RUN_DIR/index.html from what `lowbit compare --out RUN_DIR` left."""
from __future__ import annotations


def register(sub) -> dict:
    pr = sub.add_parser("report", help="write RUN_DIR/index.html from what `lowbit compare --out RUN_DIR` left")
    pr.add_argument("run_dir")
    return {"report": cmd_report}


def cmd_report(args) -> None:
    from ..analysis import write_report

    print(f"wrote {write_report(args.run_dir)}")
