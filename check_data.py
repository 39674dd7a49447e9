"""Report on a dataset before training: counts, unreadable files and why, duplicates, leakage, likely label
errors; quarantine.

Usage:
    python check_data.py DATA                          # the report; exit 1 when training on it would fail
    python check_data.py DATA --labels DATA/labels.csv # labels in a table (or --labels-from-name), as train.py
    python check_data.py DATA --json                   # the full report as JSON
    python check_data.py DATA --quarantine bad_files   # move unreadable files out (never deletes)
    python check_data.py DATA --label-errors           # also list likely wrong labels (4 folds, ~10 min)
    python check_data.py DATA --label-errors --label-error-budget 180   # quicker, and more hard images named
    python check_data.py DATA --quarantine held_out --listed curves/label_errors.csv   # move those files out
    python check_data.py PHOTOS --label-next 100 --checkpoint models/best_model.pth   # which unlabelled photos to label
    python check_data.py PHOTOS --label-next 100 --checkpoint M --move-to to_label    # and copy them there
    python train.py --data DATA --check-only           # the same report

DATA is read as train.py reads it (loading/layout.py): class folders with or without split folders, a labels table,
or labels in file names. The report starts with the 'layout:' line and the files left out, by kind.

With --label-next, DATA is a folder of unlabelled photos (any layout) and there is no report: the model ranks
them by how much labelling each would teach it (on a pretrained backbone the typical photos of what its training
photos do not cover, where it is least sure first, else uncertain photos, spread over what the model sees:
quality/label_next.py) and writes label_next.csv (rank, path, suggested label, confidence, why) and a gallery,
label_next.png, to --out-dir. --move-to copies the picks; the folder itself is never changed.
"""
from __future__ import annotations

import argparse
import sys

from config import CARVE_FIELDS, LABEL_CHECK_FIELDS, SOURCE_FIELDS, TrainConfig, add_flags, with_arch_defaults
from core.common import reports_user_errors
from quality.audit import check_data
from quality.label_errors import format_label_check, label_check_of_data, read_listed_paths
from quality.label_next import label_next


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="dataset folder, read as train.py --data reads it (README 'Your data')")
    parser.add_argument("--quarantine", metavar="DIR", default="",
                        help="move unreadable files into DIR, keeping their paths relative to DATA")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--max-bad-fraction", type=float, default=0.5,
                        help="a split with more unreadable files than this share is fatal")
    parser.add_argument("--listed", metavar="CSV", default="",
                        help="with --quarantine: move the files in this CSV's path column (label_errors.csv) "
                             "instead of the unreadable ones")
    parser.add_argument("--label-errors", action="store_true",
                        help="also find likely wrong labels: every train image is predicted by a model trained "
                             "on the other folds, then confident learning (quality/label_errors.py)")
    parser.add_argument("--label-next", type=int, default=0, metavar="N",
                        help="DATA is a folder of unlabelled photos: list the N that labelling would teach the "
                             "--checkpoint's model most (label_next.csv and .png in --out-dir)")
    parser.add_argument("--checkpoint", default="models/best_model.pth", help="the model --label-next asks")
    parser.add_argument("--move-to", metavar="DIR", default="",
                        help="with --label-next: copy the picked photos into DIR, one folder, for labelling")
    parser.add_argument("--out-dir", default="curves",
                        help="where near_leaks.png (near-copies across splits), label_errors.csv and .png, "
                             "label_next.csv and .png go")
    parser.add_argument("--workers", type=int, default=2, help="processes that decode images")
    fields = SOURCE_FIELDS + CARVE_FIELDS + LABEL_CHECK_FIELDS
    add_flags(parser, fields)
    args = parser.parse_args(argv)
    if args.listed and not args.quarantine:
        parser.error("--listed names files for --quarantine DIR to move: give both")
    if args.move_to and not args.label_next:
        parser.error("--move-to copies the photos --label-next N picks: give both")
    report_only = [flag for flag, given in (("--quarantine", args.quarantine), ("--json", args.json),
                                            ("--label-errors", args.label_errors)) if given]
    if args.label_next and report_only:
        flags = " and ".join(report_only)
        parser.error(f"{flags} {'is' if len(report_only) == 1 else 'are'} for the data report, which --label-next "
                     "does not make: run the report without --label-next")
    if args.label_next:
        return print_label_next(args.data, args.checkpoint, args.label_next, args.out_dir, args.move_to,
                                args.workers, getattr(args, "cache_dir", TrainConfig.cache_dir))
    settings = with_arch_defaults({k: v for k, v in vars(args).items() if k in fields})
    cfg = TrainConfig(data=args.data, max_bad_fraction=args.max_bad_fraction, workers=args.workers, **settings)
    sections, text = {}, ""
    if args.label_errors:
        progress = (lambda line: print(line, file=sys.stderr)) if args.json else print  # stdout: the JSON alone
        sections["label_errors"] = label_check_of_data(cfg, args.out_dir, progress)
        text = format_label_check(sections["label_errors"])
    listed = read_listed_paths(args.listed) if args.listed else None
    checked = check_data(cfg, args.quarantine, args.json, listed, sections, text, args.out_dir)
    print(checked.text)
    return checked.code


def print_label_next(folder: str, checkpoint: str, n: int, out_dir: str, move_to: str, workers: int,
                     cache_dir: str) -> int:
    found = label_next(folder, checkpoint, n, out_dir, move_to, cache_dir, workers)
    print(f"{found.images} photos in {folder} ({found.unreadable} unreadable); the {len(found.rows)} to label next, "
          "first the most useful:")
    for row in found.rows[:10]:
        print(f"  {row['rank']:>4}. {row['path']}  {row['suggested']}? {row['confidence']:.0%}  {row['why']}")
    print(f"all of them: {found.csv}; gallery: {found.gallery}")
    if found.copied:
        print(f"copied {len(found.copied)} photos to {move_to} for labelling; {folder} is unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
