"""Classifier guidance and inpainting on the toy, scored from pixels by ldm.evaluation.toy_accuracy.

    python bench/classifier_guidance_accuracy.py --model RUN/checkpoints/last.ckpt \\
        --classifier CLASSIFIER_RUN/checkpoints/last.ckpt [--out DIR] [--scales 0 2 5 10 20 40] [--cfg-scales 1 3]
        [--classifier-scale 10] [--inpaint-resample 1 3] [--seed 1000] [--draws 3]
        [--parts guided cfg inpaint]

Three parts, each setting one `python sample.py` job of ``--draws`` images per prompt (its cost: the seconds per
image of its sampling loop). Image j of prompt i has seed + i * draws + j, so "draw j" (image j of every prompt)
is an independent sample of the job, started from the same noise in every setting. The judge is independent of
the classifier: the pixels are read back by ldm.evaluation.toy_accuracy. The table gives per setting the
medians over the draws, the range of `all` (every attribute right), and medians over draws of paired
comparisons with the setting's baseline (the same draw, so the same starting noise): the gain in `all`
(points), its ratio (draws whose baseline got none right left out), and the ratio of seconds per image. Baselines: unguided (classifier scale 0) at the same CFG scale;
for inpainting, latent blending alone.

guided   the toy model sampled unconditionally (prompt "", guidance_scale=1) and steered by the classifier
         alone to each of the 105 toy captions' classes (labels=), at each of ``--scales`` (0 = unguided)
cfg      the conditional model from the 105 captions at each classifier-free guidance scale (``--cfg-scales``;
         1 = the conditional model alone), without and with classifier guidance (``--classifier-scale``)
inpaint  35 real toy images (every shape at every position) with their shape's box (plus 4 pixels) masked,
         each asked for another colour; the repainted shape is read back (colour, shape, position), and the
         known region is compared with the input (mean absolute difference, 0-255). With latent blending
         alone and with RePaint resampling (``--inpaint-resample``)

Writes DIR/bench.json (the summary and every run) and image grids of draw 0 (DIR/grid_guided.png: a row
per classifier scale; DIR/grid_inpaint.png: the inputs, then a row per inpainting setting) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.toy import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, ToySpec, all_prompts, bounding_box, render
from ldm.evaluation.toy_accuracy import parse_caption, score

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAMPLER = 20, "dpmpp_2m"  # the toy's sampling defaults (bench/toy_end_to_end.py)


def run_sample(out_dir: Path, overrides: list[str], seed: int) -> tuple[float, float]:
    """Run one sample.py job (fresh folder); returns its wall seconds and the seconds per image of its
    sampling loop (what it prints: model loading and writing metadata left out)."""
    shutil.rmtree(out_dir, ignore_errors=True)  # made afresh, so that every row is timed
    command = [
        sys.executable,
        "sample.py",
        f"out_dir={out_dir}",
        f"steps={STEPS}",
        f"sampler={SAMPLER}",
        f"seed={seed}",
        "batch_size=35",
        *overrides,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"sample.py failed ({' '.join(overrides)}):\n{result.stderr[-3000:]}")
    made = re.search(r"made (\d+) now \(([\d.]+) img/s", result.stdout)
    if made is None or int(made.group(1)) == 0:
        raise SystemExit(f"sample.py made nothing in {out_dir} (remove the folder to rerun):\n{result.stdout[-2000:]}")
    return seconds, 1 / float(made.group(2))


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def caption_of(labels: dict) -> str:
    return f"a {labels['colour']} {labels['shape']} in the {labels['position']}"


def scored_draws(folder: Path, caption_of_row, draws: int, **fields) -> list[dict]:
    """One result per draw j (image j of every prompt: seed + index, so draw j of two jobs with the same seed
    starts from the same noise), scored by the pixels against ``caption_of_row(row)``."""

    rows = rows_of(folder)
    results = []
    for draw in range(draws):
        mine = [row for row in rows if row["index"] % draws == draw]
        scores = score([Image.open(folder / row["file"]) for row in mine], [caption_of_row(row) for row in mine])
        results.append({**fields, "draw": draw, "folder": folder.name, **scores})
    return results


def guided_part(args, out: Path) -> list[dict]:
    from dataclasses import asdict

    captions = all_prompts()
    prompts = out / "unconditional.jsonl"  # the empty prompt, steered to each caption's classes
    prompts.write_text("".join(json.dumps({"prompt": "", "labels": asdict(parse_caption(c))}) + "\n" for c in captions))
    results = []
    for scale in args.scales:
        folder = out / f"guided_scale_{scale:g}"
        seconds, per_image = run_sample(
            folder,
            [
                f"checkpoint={args.model}",
                f"prompts_file={prompts}",
                "guidance_scale=1",
                f"num_images_per_prompt={args.draws}",
                *([f"classifier={args.classifier}", f"classifier_scale={scale}"] if scale else []),
            ],
            args.seed,
        )
        results += scored_draws(
            folder,
            lambda row: captions[row["index"] // args.draws],
            args.draws,
            part="guided",
            classifier_scale=scale,
            guidance_scale=1.0,
            seconds=seconds,
            seconds_per_image=per_image,
        )
    return results


def cfg_part(args, out: Path) -> list[dict]:
    prompts = out / "toy_prompts.txt"
    prompts.write_text("\n".join(all_prompts()) + "\n")
    results = []
    for cfg_scale in args.cfg_scales:
        for scale in (0.0, args.classifier_scale):
            folder = out / f"cfg_{cfg_scale:g}_classifier_{scale:g}"
            seconds, per_image = run_sample(
                folder,
                [
                    f"checkpoint={args.model}",
                    f"prompts_file={prompts}",
                    f"guidance_scale={cfg_scale}",
                    f"num_images_per_prompt={args.draws}",
                    *([f"classifier={args.classifier}", f"classifier_scale={scale}"] if scale else []),
                ],
                args.seed,
            )
            results += scored_draws(
                folder,
                lambda row: row["prompt"],
                args.draws,
                part="cfg",
                classifier_scale=scale,
                guidance_scale=cfg_scale,
                seconds=seconds,
                seconds_per_image=per_image,
            )
    return results


def inpainting_inputs(out: Path) -> tuple[Path, Path, Path, list[str]]:
    """35 toy images (7 colours x 5 positions round-robin over the 3 shapes), masks of their shape's box + 4 px,
    and prompts asking for the next colour of the palette."""

    images, masks = out / "inpaint_inputs", out / "inpaint_masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(exist_ok=True)
    colours, captions = list(COLOURS), []
    for k in range(35):
        colour, position, shape = colours[k % 7], list(POSITIONS)[k // 7], SHAPES[k % 3]
        centre_x, centre_y = POSITIONS[position]
        spec = ToySpec(colour, shape, position, centre_x, centre_y, size=22, rgb=COLOURS[colour], background=35)
        render(spec).save(images / f"{k:03d}.png")
        x0, y0, x1, y1 = bounding_box(spec)
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        mask[max(y0 - 4, 0) : y1 + 5, max(x0 - 4, 0) : x1 + 5] = 255
        Image.fromarray(mask).save(masks / f"{k:03d}.png")
        captions.append(f"a {colours[(k + 1) % 7]} {shape} in the {position}")
    prompts = out / "inpaint_prompts.txt"
    prompts.write_text("\n".join(captions) + "\n")
    return images, masks, prompts, captions


def kept_region_error(folder: Path, images: Path, masks: Path) -> float:
    """Mean |output - input| (0-255) over the pixels the masks keep."""
    errors = []
    for row in rows_of(folder):
        output = np.asarray(Image.open(folder / row["file"])).astype(float)
        source = np.asarray(Image.open(images / row["init_image"]).convert("RGB")).astype(float)
        keep = np.asarray(Image.open(masks / row["mask"])) < 128
        errors.append(np.abs(output - source)[keep].mean())
    return float(np.mean(errors))


def inpaint_part(args, out: Path) -> list[dict]:
    images, masks, prompts, captions = inpainting_inputs(out)
    results = []
    for resample in args.inpaint_resample:
        folder = out / f"inpaint_resample_{resample}"
        seconds, per_image = run_sample(
            folder,
            [
                f"checkpoint={args.model}",
                f"prompts_file={prompts}",
                f"init_images={images}",
                f"masks={masks}",
                f"guidance_scale={args.inpaint_cfg_scale}",
                f"inpaint.resample_steps={resample}",
                f"num_images_per_prompt={args.draws}",
            ],
            args.seed,
        )
        kept = kept_region_error(folder, images, masks)
        results += scored_draws(
            folder,
            lambda row: captions[row["index"] // args.draws],
            args.draws,
            part="inpaint",
            resample_steps=resample,
            guidance_scale=args.inpaint_cfg_scale,
            seconds=seconds,
            seconds_per_image=per_image,
            kept_region_error=kept,
        )
    return results


def write_grid(path: Path, folders: list[tuple[Path, int]], columns: int = 14) -> None:
    """One row per (folder, stride) of ``columns`` images (every stride-th file name), 2 px white gaps."""
    rows = [
        [Image.open(f).convert("RGB") for f in sorted(folder.glob("0*.png"))[::stride][:columns]]
        for folder, stride in folders
    ]
    side = rows[0][0].width
    grid = Image.new("RGB", (columns * (side + 2) - 2, len(rows) * (side + 2) - 2), "white")
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image, (c * (side + 2), r * (side + 2)))
    grid.save(path)


def setting_of(row: dict) -> tuple:
    """What a row measures, all but its draw."""
    if row["part"] == "inpaint":
        return ("inpaint", row["resample_steps"], row["guidance_scale"])
    return (row["part"], row["guidance_scale"], row["classifier_scale"])


def baseline_of(row: dict) -> tuple:
    """The setting each row is compared with: unguided (classifier scale 0) at its CFG scale; blending alone."""
    if row["part"] == "inpaint":
        return ("inpaint", 1, row["guidance_scale"])
    return (row["part"], row["guidance_scale"], 0.0)


def summarise(results: list[dict]) -> list[dict]:
    """Per setting, medians over draws (and the range of `all`), and the median over draws of the ratio of its
    `all` accuracy to its baseline's in the same draw (the same starting noise: a paired comparison)."""
    by_setting: dict[tuple, list[dict]] = {}
    for row in results:
        by_setting.setdefault(setting_of(row), []).append(row)
    summary = []
    for setting, rows in by_setting.items():
        base = {row["draw"]: row for row in by_setting.get(baseline_of(rows[0]), [])}
        ratios = [
            row["all"] / base[row["draw"]]["all"]
            for row in rows
            if row["draw"] in base and base[row["draw"]]["all"] > 0
        ]
        keys = ("colour", "shape", "position", "all", "seconds_per_image", "num_images") + (
            ("kept_region_error",) if setting[0] == "inpaint" else ()
        )
        summary.append(
            {
                key: rows[0][key]
                for key in ("part", "guidance_scale", "classifier_scale", "resample_steps")
                if key in rows[0]
            }
            | {key: float(np.median([row[key] for row in rows])) for key in keys}
            | {
                "all_min": min(row["all"] for row in rows),
                "all_max": max(row["all"] for row in rows),
                "all_ratio_to_baseline": float(np.median(ratios)) if ratios else None,
                "all_gain_over_baseline": float(
                    np.median([row["all"] - base[row["draw"]]["all"] for row in rows if row["draw"] in base])
                )
                if base
                else None,
                "cost_ratio_to_baseline": float(
                    np.median(
                        [
                            row["seconds_per_image"] / base[row["draw"]]["seconds_per_image"]
                            for row in rows
                            if row["draw"] in base
                        ]
                    )
                )
                if base
                else None,
                "draws": len(rows),
            }
        )
    return summary


def write_grids(out: Path, results: list[dict], draws: int) -> None:
    """grid_guided.png (a row per classifier scale; images 0, 8, 16, ... of the 105 captions, whose order is
    colour, shape, position), grid_inpaint.png (the first 14 inputs, then a row per setting); of draw 0."""
    guided = [(out / r["folder"], 8 * draws) for r in results if r["part"] == "guided" and r["draw"] == 0]
    if guided:
        write_grid(out / "grid_guided.png", guided)  # captions 0, 8, 16, ...: every colour, shape, position
    inpaint = [(out / r["folder"], draws) for r in results if r["part"] == "inpaint" and r["draw"] == 0]
    if inpaint:
        write_grid(out / "grid_inpaint.png", [(out / "inpaint_inputs", 1), *inpaint])


def print_table(summary: list[dict]) -> None:
    """Medians over draws (percent correct), the range of `all`, and the paired ratios to the baseline row."""
    print(
        f"{'part':<9}{'setting':<38}{'colour':>8}{'shape':>8}{'position':>10}{'all':>7}{'(min-max)':>13}{'+points':>9}{'x base':>8}"
        f"{'images':>8}{'s/image':>9}{'x base':>8}"
    )
    for r in summary:
        if r["part"] == "inpaint":
            setting = f"resample_steps={r['resample_steps']} (kept err {r['kept_region_error']:.1f})"
        else:
            setting = f"guidance_scale={r['guidance_scale']:g} classifier_scale={r['classifier_scale']:g}"
        gain = "-" if r["all_gain_over_baseline"] is None else f"{100 * r['all_gain_over_baseline']:+.1f}"
        ratio = "-" if r["all_ratio_to_baseline"] is None else f"{r['all_ratio_to_baseline']:.2f}"
        cost = "-" if r["cost_ratio_to_baseline"] is None else f"{r['cost_ratio_to_baseline']:.2f}"
        spread = f"({100 * r['all_min']:.0f}-{100 * r['all_max']:.0f})"
        print(
            f"{r['part']:<9}{setting:<38}"
            + "".join(f"{100 * r[k]:>{w}.1f}" for k, w in (("colour", 8), ("shape", 8), ("position", 10), ("all", 7)))
            + f"{spread:>13}{gain:>9}{ratio:>8}{int(r['num_images']):>8}{r['seconds_per_image']:>9.3f}{cost:>8}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the toy model's checkpoint (python train.py)")
    parser.add_argument(
        "--classifier", required=True, help="the toy classifier's checkpoint (experiment=toy_classifier)"
    )
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_classifier_guidance"))
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 5.0, 10.0, 20.0])
    parser.add_argument(
        "--cfg-scales", type=float, nargs="+", default=[1.0, 3.0], help="1 = the conditional model alone"
    )
    parser.add_argument("--classifier-scale", type=float, default=10.0)
    parser.add_argument("--inpaint-resample", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--inpaint-cfg-scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=3, help="images per prompt; medians are taken over the draws")
    parser.add_argument(
        "--parts", nargs="+", default=["guided", "cfg", "inpaint"], choices=["guided", "cfg", "inpaint"]
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"guided": guided_part, "cfg": cfg_part, "inpaint": inpaint_part}
    results = []
    for name in args.parts:
        results.extend(parts[name](args, out))
        (out / "bench.json").write_text(
            json.dumps({"args": vars(args), "summary": summarise(results), "results": results}, indent=2) + "\n"
        )
    print_table(summarise(results))
    write_grids(out, results, args.draws)


if __name__ == "__main__":
    main()
