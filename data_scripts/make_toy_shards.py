"""Write the toy text-to-image dataset as webdataset shards (see `ldm.data.toy` for the spec).

Example: python data_scripts/make_toy_shards.py --out data/toy --train 20000 --val 1000 --seed 0
"""

import argparse

from ldm.cli import one_line_errors
from ldm.data.toy import write_toy_shards


def main() -> None:
    """Parse the command line and write the shards."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", required=True, help="dataset directory: new, empty or an older toy dataset (replaced atomically)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if it holds other files")
    parser.add_argument("--train", type=int, default=20000, help="number of training samples")
    parser.add_argument("--val", type=int, default=1000, help="number of validation samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train and val streams")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args()
    with one_line_errors():
        write_toy_shards(
            args.out,
            num_train=args.train,
            num_val=args.val,
            seed=args.seed,
            samples_per_shard=args.samples_per_shard,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    print(f"wrote {args.train} train and {args.val} val samples to {args.out}")


if __name__ == "__main__":
    main()
