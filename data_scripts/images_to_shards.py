"""Turn a folder of images with sidecar captions, or a CSV/TSV/JSONL table, into webdataset shards.

Examples:
    python data_scripts/images_to_shards.py photos/ --out data/photos --samples-per-shard 1000 --workers 8
    python data_scripts/images_to_shards.py captions.csv --out data/photos --prefix train --max-side 1024

A folder: every image (jpg, png, webp, bmp, gif, tif) with `x.txt` beside `x.jpg` as its caption.
A table: columns `path` and `caption` (see --path-column, --caption-column); other columns go to
each sample's .json. Inputs that make no sample are skipped and counted under the loader's names
(`ldm.data.skips`): empty_caption (no caption), missing_file, empty_image, corrupt_image, corrupt_caption
(not UTF-8), ... See `ldm.data.sample_encoding` for the encoding rules, `ldm.data.shard_writing` for atomicity.
"""

import argparse
import sys

from ldm.cli import one_line_errors
from ldm.data.corpus_inputs import corpus_items
from ldm.data.shard_writing import write_shards


def main() -> None:
    """Parse the command line, write the shards, print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="a folder of images + .txt captions, or a .csv/.tsv/.jsonl table")
    parser.add_argument("--out", required=True, help="output directory for PREFIX-NNNNNN.tar")
    parser.add_argument("--prefix", default="shard", help="shard name prefix, e.g. train or val")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar file")
    parser.add_argument("--max-side", type=int, default=None, help="downscale images whose longest side is larger")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (0 or 1: this process)")
    parser.add_argument("--root", default=None, help="table paths are relative to this (default: the table's folder)")
    parser.add_argument("--path-column", default="path", help="table column with the image path")
    parser.add_argument("--caption-column", default="caption", help="table column with the caption")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of an earlier run with this prefix")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args()
    with one_line_errors():
        items, total = corpus_items(args.input, args.root, args.path_column, args.caption_column)
        summary = write_shards(
            items,
            args.out,
            prefix=args.prefix,
            samples_per_shard=args.samples_per_shard,
            max_side=args.max_side,
            workers=args.workers,
            total=total,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    for skipped in summary.skipped_examples[:5]:
        print(f"skipped {skipped.source or skipped.index}: {skipped.reason} {skipped.detail}".rstrip(), file=sys.stderr)
    print(summary.line())


if __name__ == "__main__":
    main()
