"""Report on image-caption webdataset shards: counts, sizes, caption and resolution statistics,
what the loader would skip and why, and a contact sheet of random samples.

Examples:
    python data_scripts/inspect_shards.py "data/photos/train-{000000..000099}.tar"
    python data_scripts/inspect_shards.py "data/photos/*.tar" --json report.json --contact-sheet sheet.png --samples 32

Bad samples and shards are named as the loader counts them (`ldm.data.skips`: no_image, corrupt_image,
empty_caption, truncated_shard, ...). See `ldm.data.shard_inspection` for exactly what is counted and how.
"""

import argparse
import json

from ldm import atomic
from ldm.cli import one_line_errors
from ldm.data.contact_sheet import SheetLayout
from ldm.data.inspection_text import format_report
from ldm.data.shard_inspection import inspect_shards, save_contact_sheet
from ldm.data.shards import expand_shards


def main() -> None:
    """Parse the command line, inspect the shards, print and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shards", nargs="+", help="shard specs: brace patterns, globs or paths")
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    parser.add_argument("--contact-sheet", default=None, help="write a PNG contact sheet of random samples here")
    parser.add_argument("--samples", type=int, default=32, help="samples on the contact sheet")
    parser.add_argument("--seed", type=int, default=0, help="seed of the contact sheet's choice")
    parser.add_argument("--thumb", type=int, default=160, help="contact sheet thumbnail size in px")
    parser.add_argument("--columns", type=int, default=8, help="contact sheet columns")
    parser.add_argument("--no-decode", action="store_true", help="check image headers only (faster)")
    parser.add_argument("--caption-key", default="txt", help="caption member extension")
    parser.add_argument("--workers", type=int, default=1, help="processes reading shards (0 or 1: this process)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args()
    layout = SheetLayout(thumb=args.thumb, columns=args.columns)
    with one_line_errors():
        urls = expand_shards(args.shards)
        report = inspect_shards(
            urls,
            decode=not args.no_decode,
            sheet_samples=args.samples if args.contact_sheet else 0,
            seed=args.seed,
            layout=layout,
            workers=args.workers,
            caption_key=args.caption_key,
            progress=not args.no_progress,
        )
    print(format_report(report))
    if args.json:
        atomic.write_text(args.json, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")
    if args.contact_sheet:
        save_contact_sheet(report, args.contact_sheet, layout)
        print(f"wrote {args.contact_sheet} ({len(report.sheet)} samples)")


if __name__ == "__main__":
    main()
