"""The toy LoRA figure: a LoRA teaches the trained toy a colour word it has never seen, and keeps the rest.

    python bench/toy_lora.py --base TOY_RUN/checkpoints/last.ckpt [--run-dir DIR] [--word crimson]
        [--colour red] [--steps 400] [--rank 8] [--images-per-prompt 4] [--toy-images-per-prompt 2] [--skip-train]
        [-- TRAIN_OVERRIDES...]

1. Writes a folder of toy images (ldm/data/toy.py's renderer): ``--new`` images of ``--colour`` shapes
   captioned with ``--word`` ("a crimson circle in the top left") and ``--keep`` ordinary toy images with
   their own captions (the regularisation that keeps the other prompts, as DreamBooth's class images do).
2. Trains a LoRA on it from the base: ``python train.py experiment=toy model.pretrained=BASE data=folder
   task.lora.rank=R ...`` (the exact command is printed).
3. Samples, before (the base) and after (the LoRA run's checkpoint, which stands alone), the 15 prompts
   with the new word (every shape and position; ``--images-per-prompt`` each) and the 105 toy prompts
   (``--toy-images-per-prompt`` each), DPM-Solver++(2M), 20 steps, seed 1000,
   guidance 3, and scores them from the pixels (ldm/evaluation/toy_accuracy.py; the new word scored as
   ``--colour``). Prints one table, writes DIR/bench.json and the figure DIR/toy_lora.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ldm.atomic import atomic_directory, atomic_path, write_text

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str]) -> float:
    print("+ " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def write_data(target: Path, word: str, colour: str, new: int, keep: int, seed: int) -> None:
    """``new`` images of ``colour`` captioned with ``word``, ``keep`` ordinary ones; x.png + x.txt.
    Filled under a temporary name and renamed (``ldm.atomic.atomic_directory``): a killed run never
    trains on part of it."""
    from ldm.data.toy import caption, render, sample_spec

    rng = np.random.default_rng(seed)
    with atomic_directory(target) as folder:
        made = 0
        while made < new:
            spec = sample_spec(rng)
            if spec.colour == colour:
                render(spec).save(folder / f"new_{made:05d}.png")
                (folder / f"new_{made:05d}.txt").write_text(caption(spec).replace(f"a {colour} ", f"a {word} ", 1))
                made += 1
        for i in range(keep):
            spec = sample_spec(rng)
            render(spec).save(folder / f"keep_{i:05d}.png")
            (folder / f"keep_{i:05d}.txt").write_text(caption(spec))


def new_word_prompts(word: str) -> list[str]:
    from ldm.data.toy import POSITIONS, SHAPES

    return [f"a {word} {shape} in the {position}" for shape in SHAPES for position in POSITIONS]


def sample(checkpoint: Path, prompts: list[str], out_dir: Path, images_per_prompt: int) -> None:
    prompts_file = out_dir.with_suffix(".txt")
    prompts_file.parent.mkdir(parents=True, exist_ok=True)
    write_text(prompts_file, "\n".join(prompts) + "\n")
    run(
        [
            sys.executable,
            "sample.py",
            f"checkpoint={checkpoint}",
            f"prompts_file={prompts_file}",
            f"num_images_per_prompt={images_per_prompt}",
            "sampler=dpmpp_2m",
            "steps=20",
            "guidance_scale=3",
            "seed=1000",
            f"out_dir={out_dir}",
            "batch_size=105",
            "device=cpu",
        ]
    )


def scores(folder: Path, word: str, colour: str) -> dict:
    """toy_accuracy of a sample folder, the new word read as ``colour``; plus the colours drawn."""
    from PIL import Image

    from ldm.evaluation.toy_accuracy import classify, score

    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    images = [Image.open(folder / r["file"]) for r in records]
    prompts = [r["prompt"].replace(f"a {word} ", f"a {colour} ", 1) for r in records]
    result = score(images, prompts)
    drawn: dict[str, int] = {}
    for image in images:
        found = classify(image).colour
        drawn[found] = drawn.get(found, 0) + 1
    result["colours_drawn"] = dict(sorted(drawn.items(), key=lambda kv: -kv[1]))
    return result


def figure(
    before: Path,
    after: Path,
    base_before: Path,
    base_after: Path,
    word: str,
    colour: str,
    out: Path,
    per_prompt: int,
    toy_per_prompt: int,
) -> None:
    """Rows: prompts; columns: the base's images | the LoRA's (same seeds)."""
    from PIL import Image, ImageDraw

    rows = [
        (before, after, i * per_prompt, per_prompt) for i in (0, 6, 12)
    ]  # circle top left, square top right, triangle bottom left
    rows += [(base_before, base_after, i * toy_per_prompt, toy_per_prompt) for i in (7, 40, 101)]  # three toy prompts
    cell, gap, label_h = 64, 4, 14
    width = 2 * per_prompt * cell + 3 * gap
    canvas = Image.new("RGB", (width, label_h + len(rows) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 1), "base model", fill="black")
    draw.text((per_prompt * cell + 2 * gap, 1), f"with the LoRA ('{word}' = {colour})", fill="black")
    for r, (left, right, first, count) in enumerate(rows):
        y = label_h + r * (cell + label_h)
        records = [json.loads(line) for line in (left / "metadata.jsonl").read_text().splitlines() if line.strip()]
        draw.text((gap, y), records[first]["prompt"], fill="black")
        for column, folder in enumerate((left, right)):
            for j in range(count):
                image = Image.open(folder / f"{first + j:06d}.png").convert("RGB")
                canvas.paste(image, (gap + column * (per_prompt * cell + gap) + j * cell, y + label_h - 2))
    with atomic_path(out) as temp:
        canvas.save(temp, format="PNG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a trained toy run's checkpoint")
    parser.add_argument("--run-dir", default=str(ROOT / "outputs" / "bench_toy_lora"))
    parser.add_argument("--word", default="crimson")
    parser.add_argument("--colour", default="red")
    parser.add_argument("--new", type=int, default=600, help="images with the new word")
    parser.add_argument("--keep", type=int, default=600, help="ordinary toy images beside them")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--images-per-prompt", type=int, default=4, help="per prompt with the new word")
    parser.add_argument("--toy-images-per-prompt", type=int, default=2, help="per toy prompt (105 of them)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides")
    args = parser.parse_args()

    run_dir, base = Path(args.run_dir), Path(args.base).resolve()
    data = run_dir / "data"
    train_seconds = None
    if not args.skip_train:
        if not data.is_dir():
            write_data(data, args.word, args.colour, args.new, args.keep, seed=1)
        train_seconds = run(
            [
                sys.executable,
                "train.py",
                "experiment=toy",
                f"model.pretrained={base}",
                "data=folder",
                f"data.path={data}",
                "data.image_size=64",
                "data.num_workers=2",
                f"task.lora.rank={args.rank}",
                "optim=adamw_cosine",
                f"optim.optimizer.lr={args.lr}",
                "optim.lr_scheduler.schedule.warmup_steps=20",
                f"trainer.max_steps={args.steps}",
                f"callbacks.checkpoint.every_n_train_steps={args.steps}",
                "logger=csv",
                "run_name=toy_lora",
                f"hydra.run.dir={run_dir / 'run'}",
                "resume=auto",
                *args.overrides,
            ]
        )
    lora_checkpoint = run_dir / "run" / "checkpoints" / "last.ckpt"
    from ldm.data.toy import all_prompts

    start = time.perf_counter()
    folders = {}
    for name, checkpoint in (("base", base), ("lora", lora_checkpoint)):
        folders[f"{name}_new"] = run_dir / f"samples_{name}_{args.word}"
        folders[f"{name}_toy"] = run_dir / f"samples_{name}_toy"
        sample(checkpoint, new_word_prompts(args.word), folders[f"{name}_new"], args.images_per_prompt)
        sample(checkpoint, all_prompts(), folders[f"{name}_toy"], args.toy_images_per_prompt)
    sample_seconds = time.perf_counter() - start
    results = {key: scores(folder, args.word, args.colour) for key, folder in folders.items()}

    print(
        f"\ntoy LoRA: '{args.word}' = {args.colour}; rank {args.rank}, {args.steps} steps"
        f"{f' in {train_seconds:.0f} s' if train_seconds else ''} (sampling {sample_seconds:.0f} s)"
    )
    print(f"{'prompts':<34}{'model':<7}{'colour':>8}{'shape':>8}{'position':>9}{'all':>8}{'images':>8}")
    for prompts, label in (("new", f"'{args.word}' (15 prompts, as {args.colour})"), ("toy", "the 105 toy prompts")):
        for model in ("base", "lora"):
            r = results[f"{model}_{prompts}"]
            print(
                f"{label:<34}{model:<7}{r['colour']:>8.3f}{r['shape']:>8.3f}{r['position']:>9.3f}{r['all']:>8.3f}"
                f"{r['num_images']:>8d}"
            )
            label = ""
    for model in ("base", "lora"):
        print(f"colours drawn for '{args.word}' by the {model}: {results[f'{model}_new']['colours_drawn']}")
    figure(
        folders["base_new"],
        folders["lora_new"],
        folders["base_toy"],
        folders["lora_toy"],
        args.word,
        args.colour,
        run_dir / "toy_lora.png",
        args.images_per_prompt,
        args.toy_images_per_prompt,
    )
    write_text(
        run_dir / "bench.json",
        json.dumps(
            {
                "word": args.word,
                "colour": args.colour,
                "rank": args.rank,
                "steps": args.steps,
                "lr": args.lr,
                "base": str(base),
                "train_seconds": train_seconds,
                "sample_seconds": sample_seconds,
                "results": results,
            },
            indent=2,
        )
        + "\n",
    )
    print(f"figure: {run_dir / 'toy_lora.png'}")


if __name__ == "__main__":
    main()
