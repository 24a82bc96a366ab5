"""Toy recipe sweep: several `train.py` runs side by side on one GPU, then every checkpoint scored.

    python bench/toy_sweep.py RUNS_FILE [--out DIR] [--deadline SECONDS] [--every 1000]
        [--score-workers 4] [--common "OVERRIDE ..."]

RUNS_FILE holds one run a line: a name, then its train.py overrides, e.g.

    base      trainer.max_steps=2000
    bs32      trainer.max_steps=2000 data.batch_size=32

Every run trains at once (a GPU holds a dozen toy runs; each gets the toy's data loader), saves a
checkpoint every --every steps, and is stopped at --deadline seconds if still running. Then every
checkpoint (and last.ckpt of a run that ended between two) is scored like bench/toy_end_to_end.py
does: the 105 toy prompts x 4 images, DPM-Solver++(2M), 20 steps, guidance 3, colour / shape /
position read from the pixels (the run's final weights also without EMA). Writes DIR/scores.jsonl
and prints a table. Accuracy depends on the steps and the recipe, not on the hardware, so a GPU
sweep ranks recipes for the CPU
target; single runs differ by +-8 points (all three) from the seed alone, so repeat what matters.

First-stage runs (`experiment=toy_vae` lines) train side by side too but are not scored: their
`DIR/NAME/autoencoder.safetensors` (scaling factor in its metadata and log) is for a second sweep
whose runs set `model.autoencoder.path` and `model.autoencoder.module.scaling_factor`
(bench/toy_sweep_runs/vaes.txt and vae_latents.txt).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_runs(path: Path) -> list[tuple[str, list[str]]]:
    runs = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, *overrides = shlex.split(line)
            runs.append((name, overrides))
    return runs


def train_all(runs: list[tuple[str, list[str]]], out: Path, common: list[str], every: int, deadline: float) -> None:
    processes = {}
    for name, overrides in runs:
        command = [
            sys.executable,
            "train.py",
            f"hydra.run.dir={out / name}",
            "logger=csv",
            "callbacks.checkpoint.save_top_k=-1",
            f"callbacks.checkpoint.every_n_train_steps={every}",
            *common,
            *overrides,
        ]
        with (out / f"{name}.log").open("w") as log:  # the child keeps its own copy of the handle
            processes[name] = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    start = time.monotonic()
    while any(p.poll() is None for p in processes.values()) and time.monotonic() - start < deadline:
        time.sleep(5)
    for name, process in processes.items():
        if process.poll() is None:
            process.terminate()  # the run guard saves last.ckpt; the step checkpoints are already there
            print(f"{name}: stopped at the deadline", flush=True)
        elif process.returncode != 0:
            print(f"{name}: failed (exit {process.returncode}), see {out / name}.log", flush=True)
    for process in processes.values():
        process.wait()


def score_runs(run_dirs: list[Path], scores_file: Path) -> None:
    """Score every step checkpoint of these runs, and last.ckpt where the run ended between step
    checkpoints, appending one JSON line per checkpoint."""
    import torch
    from samplers import run as sample_and_score  # bench/samplers.py: same sampling and scoring

    from ldm.data.toy import all_prompts
    from ldm.pipeline import pipeline_from_checkpoint

    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [p for p in all_prompts() for _ in range(4)]
    seeds = [1000 + i for i in range(len(prompts))]
    for run_dir in run_dirs:
        if (run_dir / "autoencoder.safetensors").is_file():  # a first-stage run (experiment=toy_vae): a VAE to use
            continue
        checkpoints = sorted(run_dir.glob("checkpoints/step_*.ckpt"))
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.is_file() and not _same_step_saved(last, checkpoints):
            checkpoints.append(last)
        for checkpoint in checkpoints:
            for use_ema in (True, False) if checkpoint == checkpoints[-1] else (True,):
                pipeline, _ = pipeline_from_checkpoint(str(checkpoint), use_ema=use_ema, device=device)
                scores, _ = sample_and_score(pipeline, "dpmpp_2m", 20, prompts, seeds, 3.0, len(prompts))
                row = {"run": run_dir.name, "checkpoint": checkpoint.name, "ema": use_ema, **scores}
                with scores_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")


def _same_step_saved(last: Path, step_checkpoints: list[Path]) -> bool:
    """Whether a step checkpoint already holds last.ckpt's step (a run that ended on a checkpoint step)."""
    from ldm.checkpoints import load_training_checkpoint

    step = load_training_checkpoint(last).get("global_step")
    return any(c.name == f"step_{step:07d}.ckpt" for c in step_checkpoints)


def print_table(scores_file: Path) -> None:
    print("| run | checkpoint | EMA | all three | colour | shape | position |")
    print("|---|---|---|---|---|---|---|")
    rows = [json.loads(line) for line in scores_file.read_text().splitlines()]
    for r in sorted(rows, key=lambda r: (r["run"], r["checkpoint"], not r["ema"])):
        print(
            f"| {r['run']} | {r['checkpoint']} | {'yes' if r['ema'] else 'no'} | {100 * r['all']:.1f} | "
            f"{100 * r['colour']:.1f} | {100 * r['shape']:.1f} | {100 * r['position']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_file", type=Path, nargs="?")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "toy_sweep")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds of training before runs are stopped")
    parser.add_argument("--every", type=int, default=1000, help="checkpoint every this many steps")
    parser.add_argument("--score-workers", type=int, default=4)
    parser.add_argument("--common", default="", help="overrides for every run (one string)")
    parser.add_argument("--score", nargs="+", type=Path, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()

    scores_file = args.out / "scores.jsonl"
    if args.score:
        score_runs(args.score, scores_file)
        return
    if args.runs_file is None:
        parser.error("RUNS_FILE is required")
    runs = read_runs(args.runs_file)
    args.out.mkdir(parents=True, exist_ok=True)
    scores_file.unlink(missing_ok=True)
    train_all(runs, args.out, shlex.split(args.common), args.every, args.deadline)
    run_dirs = [args.out / name for name, _ in runs if (args.out / name).is_dir()]
    shares = [run_dirs[i :: args.score_workers] for i in range(args.score_workers)]
    workers = [
        subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--score", *map(str, share)], cwd=ROOT)
        for share in shares
        if share
    ]
    if any(worker.wait() for worker in workers):
        print("a scoring worker failed (see its output above)", flush=True)
    if scores_file.is_file():
        print_table(scores_file)


if __name__ == "__main__":
    main()
