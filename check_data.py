"""Report on a dataset before training: counts, unreadable files and why, duplicates, leakage; quarantine.

Usage:
    python check_data.py DATA                          # the report; exit 1 when training on it would fail
    python check_data.py DATA --labels DATA/labels.csv # labels in a table (or --labels-from-name), as train.py
    python check_data.py DATA --json                   # the full report as JSON
    python check_data.py DATA --quarantine bad_files   # move unreadable files out (never deletes)
    python train.py --data DATA --check-only           # the same report

DATA is read as train.py reads it (layout.py): class folders with or without split folders, a labels table,
or labels in file names. The report starts with the 'layout:' line and the files left out, by kind.
"""
from __future__ import annotations

import argparse
import sys

from audit import check_data
from common import reports_user_errors
from config import CARVE_FIELDS, SOURCE_FIELDS, TrainConfig, add_flags


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="dataset folder, read as train.py --data reads it (README 'Your data')")
    parser.add_argument("--quarantine", metavar="DIR", default="",
                        help="move unreadable files into DIR, keeping their paths relative to DATA")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--max-bad-fraction", type=float, default=0.5,
                        help="a split with more unreadable files than this share is fatal")
    parser.add_argument("--workers", type=int, default=2, help="processes that decode images")
    add_flags(parser, SOURCE_FIELDS + CARVE_FIELDS)
    args = parser.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k in SOURCE_FIELDS + CARVE_FIELDS}
    cfg = TrainConfig(data=args.data, max_bad_fraction=args.max_bad_fraction, workers=args.workers, **settings)
    return check_data(cfg, args.quarantine, args.json)


if __name__ == "__main__":
    sys.exit(main())
