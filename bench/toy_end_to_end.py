"""The toy's end-to-end figure: wall time of `python train.py` and prompt accuracy of its samples.

    python bench/toy_end_to_end.py [--run-dir DIR] [--skip-train] [--images-per-prompt 4]
                                   [--guidance-interval T_MIN T_MAX] [-- TRAIN_OVERRIDES...]

Trains the toy (default config unless overrides are given), then samples every one of the 105 toy
prompts with DPM-Solver++(2M), 20 steps, guidance 3 (at every step, or only at timesteps in
``--guidance-interval``), and scores colour, shape and position from the pixels
(ldm/evaluation/toy_accuracy.py). Prints one table; writes DIR/bench.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(ROOT / "outputs" / "bench_toy"))
    parser.add_argument("--skip-train", action="store_true", help="score an existing run directory")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument(
        "--guidance-interval",
        type=int,
        nargs=2,
        metavar=("T_MIN", "T_MAX"),
        help="guide only at these timesteps (sample.py guidance_interval); default: every step",
    )
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides")
    args = parser.parse_args()

    from ldm.data.toy import all_prompts
    from ldm.evaluation.toy_accuracy import score_folder

    run_dir = Path(args.run_dir)
    train_seconds = None
    if not args.skip_train:
        train_seconds = run([sys.executable, "train.py", f"hydra.run.dir={run_dir}", *args.overrides])
    prompts_file = run_dir / "toy_prompts.txt"
    prompts_file.write_text("\n".join(all_prompts()) + "\n")
    interval = args.guidance_interval
    suffix = f"_interval_{interval[0]}_{interval[1]}" if interval else ""
    samples = run_dir / f"eval_{args.sampler}_{args.steps}{suffix}"
    sample_seconds = run(
        [
            sys.executable,
            "sample.py",
            f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}",
            f"prompts_file={prompts_file}",
            f"num_images_per_prompt={args.images_per_prompt}",
            f"sampler={args.sampler}",
            f"steps={args.steps}",
            f"guidance_scale={args.guidance_scale}",
            "seed=1000",
            f"out_dir={samples}",
            "batch_size=105",
            *([f"guidance_interval=[{interval[0]},{interval[1]}]"] if interval else []),
        ]
    )
    scores = score_folder(samples)
    result = {
        "train_seconds": train_seconds,
        "sample_seconds": sample_seconds,
        "sampler": args.sampler,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "guidance_interval": interval,
        **scores,
    }
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'train wall time':<22}{'-' if train_seconds is None else f'{train_seconds:.0f} s'}")
    print(f"{'sampling wall time':<22}{sample_seconds:.0f} s for {scores['num_images']} images")
    for key in ("colour", "shape", "position", "all"):
        print(f"{'accuracy ' + key:<22}{100 * scores[key]:.1f} %")


if __name__ == "__main__":
    main()
