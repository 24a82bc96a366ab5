"""Evaluate a folder of samples (FID, CLIP score, toy prompt accuracy) into one ``metrics.json``.

Usage::

    python -m ldm.evaluation.metrics SAMPLES_DIR [--reference DIR|SHARDS] [--reference-stats FILE.npz]
        [--fid-weights PATH [--fid-variant fid|torchvision]] [--clip-weights PATH [--clip-model ViT-B-32]]
        [--toy] [--batch-size 50] [--device auto] [--out SAMPLES_DIR/metrics.json]

SAMPLES_DIR holds the images and the ``metadata.jsonl`` that ``sample.py`` writes (``file``,
``prompt``, seed and sampler settings per image). Each metric runs when configured: FID with
``--fid-weights`` against ``--reference`` images (a folder, or webdataset shards) whose statistics
are cached in ``--reference-stats`` (reused on later runs, refused if made by another extractor or
from another reference); CLIP score with ``--clip-weights``, each image against its prompt; the toy
prompt accuracy with ``--toy``. The file also records the sample count, the sampler settings that
are uniform across ``metadata.jsonl`` and the checkpoint's identity (path, size, sha256 of its first
64 MiB). Under torchrun the ranks split the images and rank 0 writes the file. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ldm import atomic
from ldm.checkpoints import resolve_path
from ldm.cli import one_line_errors
from ldm.data.shards import ShardSpecError, expand_shards
from ldm.errors import UserError
from ldm.evaluation.clip_score import CLIPScorer, clip_score, load_clip_scorer
from ldm.evaluation.fid import FeatureExtractor, feature_statistics, reference_statistics
from ldm.evaluation.fid_inception import FID_WEIGHTS_URL, INCEPTION_VARIANTS, InceptionV3Features
from ldm.evaluation.fid_statistics import frechet_distance, gather
from ldm.evaluation.file_identity import file_fingerprint
from ldm.evaluation.image_sets import ImageSet, folder_images, read_images, read_metadata
from ldm.evaluation.toy_accuracy import score_folder

PER_IMAGE_FIELDS = ("file", "prompt", "seed")  # never sampler settings
CHECKPOINT_FIELDS = ("checkpoint", "use_ema")  # reported under "checkpoint"


def sampling_settings(rows: list[dict[str, Any]] | None) -> tuple[dict[str, Any], list[str]]:
    """(settings uniform across the metadata rows, names of the fields that vary), per-image fields aside."""
    if not rows:
        return {}, []
    names = sorted({name for row in rows for name in row} - set(PER_IMAGE_FIELDS) - set(CHECKPOINT_FIELDS))
    uniform, varying = {}, []
    for name in names:
        values = {json.dumps(row.get(name, "<missing>"), sort_keys=True) for row in rows}
        if len(values) == 1 and name in rows[0]:
            uniform[name] = rows[0][name]
        else:
            varying.append(name)
    return uniform, varying


def checkpoint_identity(rows: list[dict[str, Any]] | None, samples_dir: Path) -> dict[str, Any] | None:
    """The checkpoint named in the metadata (if one for all rows): path, and size + sha256 of its
    first 64 MiB when the file is found (as given, or relative to the samples folder)."""
    if not rows or any(row.get("checkpoint") != rows[0].get("checkpoint") for row in rows):
        return None
    name = rows[0].get("checkpoint")
    if name is None:
        return None
    identity: dict[str, Any] = {"path": str(name)}
    if all(row.get("use_ema") == rows[0].get("use_ema") for row in rows) and "use_ema" in rows[0]:
        identity["use_ema"] = rows[0]["use_ema"]
    candidates = [resolve_path(name), samples_dir / str(name)]
    found = next((path for path in candidates if path.exists()), None)
    if found is None:
        identity["found"] = False
    elif found.is_file():
        identity.update(file_fingerprint(found))
    else:
        identity.update(path=str(found.resolve()), kind="folder")  # a diffusers folder: no single file to hash
    return identity


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_reference(reference: str) -> None:
    """Fail early, in one line, on a reference that is neither a folder nor readable shards."""
    if Path(reference).expanduser().is_dir():
        return
    try:
        expand_shards(reference)
    except ShardSpecError as error:
        raise UserError(f"reference {reference!r} is neither a folder nor shards ({error})") from None


def _fid(
    folder: Path,
    extractor: FeatureExtractor,
    reference: str | None,
    reference_stats: str | Path | None,
    batch_size: int,
    device: torch.device | str,
    progress: bool,
) -> dict[str, Any]:
    if reference is None and (reference_stats is None or not Path(reference_stats).is_file()):
        raise UserError("FID needs --reference images or an existing --reference-stats file")
    rank, world = _rank_and_world()
    references = None
    if reference is not None:
        _check_reference(reference)
        references = ImageSet(reference, batch_size, rank, world)
    ref = reference_statistics(
        references,
        extractor,
        batch_size,
        device,
        cache=reference_stats,
        source=references.source if references else None,
        total=references.count() if references else None,
        progress=progress,
    )
    generated = ImageSet(str(folder), batch_size, rank, world)
    gen = gather(feature_statistics(generated, extractor, batch_size, device, generated.count(), progress, "generated"))
    return {
        "value": frechet_distance(gen, ref),
        "num_generated": gen.count,
        "num_reference": ref.count,
        "reference": references.source if references else None,
        "reference_stats": str(reference_stats) if reference_stats is not None else None,
        "extractor": extractor.description,
    }


def _clip(
    folder: Path, rows: list[dict[str, Any]] | None, scorer: CLIPScorer, batch_size: int, device, progress: bool
) -> dict[str, Any]:
    if rows is None:
        raise UserError(f"the CLIP score needs each image's prompt: no metadata.jsonl in {folder}")
    missing = [row["file"] for row in rows if not isinstance(row.get("prompt"), str)]
    if missing:
        raise UserError(f"the CLIP score needs a 'prompt' for every image in {folder}/metadata.jsonl: {missing[0]}")
    rank, world = _rank_and_world()
    paths = folder_images(folder)[rank::world]
    prompts = [row["prompt"] for row in rows][rank::world]

    def pairs():
        start = 0
        for images in read_images(paths, batch_size):
            yield images, prompts[start : start + len(images)]
            start += len(images)

    result = clip_score(pairs(), scorer, device, total=len(paths), progress=progress)
    return {"value": result.score, "num_pairs": result.num_pairs, "model": scorer.description}


def evaluate(
    samples_dir: str | Path,
    *,
    fid_extractor: FeatureExtractor | None = None,
    reference: str | None = None,
    reference_stats: str | Path | None = None,
    clip_scorer: CLIPScorer | None = None,
    toy: bool = False,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Every configured metric of the samples in ``samples_dir``, as the dict written to metrics.json.

    FID runs when ``fid_extractor`` is given (against ``reference`` and/or ``reference_stats``),
    the CLIP score when ``clip_scorer`` is, the toy prompt accuracy when ``toy``.
    """
    folder = Path(samples_dir).expanduser()
    if not folder.is_dir():
        raise NotADirectoryError(f"samples folder not found: {folder}")
    if fid_extractor is None and clip_scorer is None and not toy:
        raise UserError("nothing to compute: give --fid-weights, --clip-weights and/or --toy")
    rows = read_metadata(folder)
    settings, varying = sampling_settings(rows)
    results: dict[str, Any] = {
        "samples_dir": str(folder.resolve()),
        "num_images": len(folder_images(folder)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": checkpoint_identity(rows, folder),
        "sampling": settings,
        "varying_fields": varying,
    }
    if fid_extractor is not None:
        results["fid"] = _fid(folder, fid_extractor, reference, reference_stats, batch_size, device, progress)
    if clip_scorer is not None:
        results["clip_score"] = _clip(folder, rows, clip_scorer, batch_size, device, progress)
    if toy:
        try:
            results["toy_accuracy"] = score_folder(folder)
        except ValueError as error:  # a prompt that is not a toy caption, a row without one
            raise UserError(f"toy accuracy: {error}") from None
    return results


def _existing_file(path: str, what: str, hint: str = "") -> str:
    if not resolve_path(path).is_file():
        raise UserError(f"{what} not found: {path}{hint}")
    return path


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes (several ranks only)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _summary(results: dict[str, Any]) -> str:
    lines = [f"{'images':<16}{results['num_images']:>12d}"]
    for name in ("fid", "clip_score"):
        if name in results:
            lines.append(f"{name:<16}{results[name]['value']:>12.4f}")
    if "toy_accuracy" in results:
        lines.append(f"{'toy accuracy':<16}{results['toy_accuracy']['all']:>12.4f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build what ``args`` configure, evaluate, and write the JSON (rank 0); returns the results."""
    wants_fid = args.fid_weights is not None
    if (args.reference is not None or args.reference_stats is not None) and not wants_fid:
        raise UserError(f"FID needs --fid-weights (the standard file: {FID_WEIGHTS_URL})")
    if not Path(args.samples_dir).expanduser().is_dir():
        raise NotADirectoryError(f"samples folder not found: {args.samples_dir}")
    cached = args.reference_stats is not None and Path(args.reference_stats).is_file()
    if wants_fid and args.reference is None and not cached:
        raise UserError("FID needs --reference images or an existing --reference-stats file")
    device = _pick_device(args.device)
    _init_distributed(device)
    fid_extractor = None
    if wants_fid:
        hint = f" (the standard FID weights: {FID_WEIGHTS_URL})"
        fid_extractor = InceptionV3Features(_existing_file(args.fid_weights, "FID weights", hint), args.fid_variant)
    clip_scorer = None
    if args.clip_weights is not None:
        clip_scorer = load_clip_scorer(args.clip_model, _existing_file(args.clip_weights, "CLIP weights"))
    results = evaluate(
        args.samples_dir,
        fid_extractor=fid_extractor,
        reference=args.reference,
        reference_stats=args.reference_stats,
        clip_scorer=clip_scorer,
        toy=args.toy,
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
    )
    if _rank_and_world()[0] == 0:
        out = Path(args.out) if args.out else Path(args.samples_dir) / "metrics.json"
        atomic.write_text(out, json.dumps(results, indent=2) + "\n")
        print(_summary(results))
        print(f"wrote {out}")
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ldm.evaluation.metrics",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("samples_dir", help="folder of samples with metadata.jsonl")
    p.add_argument("--reference", help="FID reference images: a folder or webdataset shards (brace/glob)")
    p.add_argument("--reference-stats", help="cache of the reference statistics (.npz): read if present, else written")
    p.add_argument(
        "--fid-weights",
        help="Inception-v3 weights file: pt_inception-2015-12-05-6726825d.pth, "
        f"downloaded by hand from {FID_WEIGHTS_URL}",
    )
    p.add_argument(
        "--fid-variant",
        default="fid",
        choices=sorted(INCEPTION_VARIANTS),
        help="'torchvision': torchvision's ImageNet weights, a non-standard FID",
    )
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name, or an open_clip config .json")
    p.add_argument("--clip-weights", help="open_clip weights file for the CLIP score")
    p.add_argument("--toy", action="store_true", help="toy prompt accuracy (samples of the toy dataset)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", help="output JSON (default: SAMPLES_DIR/metrics.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; a user's mistake exits 1 with one line on stderr."""
    args = parser().parse_args(argv)
    with one_line_errors():
        run(args)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
