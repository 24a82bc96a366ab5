"""Fréchet Inception Distance: image batches in, feature statistics and the distance out.

FID (Heusel et al. 2017) compares Gaussians fitted to the Inception-v3 pool3 features of two image
sets. Its parts live by job: ``fid_inception`` (pytorch-fid's network on a local weights file),
``fid_statistics`` (streamed float64 moments, gathering across ranks, the cache file, the distance)
and ``image_sets`` (folders and shards as uint8 batches). This module runs images through an
extractor into statistics and compares two sets, on one process or across ``torch.distributed``
ranks. With the same weights the result is pytorch-fid's FID (tests/evaluation/test_fid.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from ldm.errors import UserError
from ldm.evaluation.fid_statistics import FeatureStatistics, frechet_distance, gather
from ldm.evaluation.image_sets import ImageBatch, rebatch

# clip_score.py imports these two from here; their homes are file_identity and image_sets


class FeatureExtractor(Protocol):
    """uint8 images (B, 3, H, W) -> features (B, feature_dim), any float dtype and device.

    ``description`` names the network, its weights and its preprocessing: cached statistics are
    reused only by an extractor with an equal description. Any ``nn.Module`` with these two
    attributes fits (random-weight test extractors, CLIP image towers for FD-CLIP, ...).
    """

    feature_dim: int
    description: str

    def __call__(self, images: Tensor) -> Tensor: ...


@torch.no_grad()
def feature_statistics(
    batches: Iterable[ImageBatch],
    extractor: FeatureExtractor,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    total: int | None = None,
    progress: bool = True,
    desc: str = "features",
) -> FeatureStatistics:
    """Statistics of ``extractor``'s features of every image in ``batches`` (this process's share).

    Moves an ``nn.Module`` extractor to ``device``; under ``torch.distributed`` combine ranks with
    ``gather``. ``total`` (images) only sizes the progress bar.
    """
    device = torch.device(device)
    if isinstance(extractor, nn.Module):
        extractor.to(device)
    stats = FeatureStatistics.empty(extractor.feature_dim, extractor.description, device)
    with tqdm(total=total, desc=desc, unit="img", disable=not progress or _rank() != 0) as bar:
        for images in rebatch(batches, batch_size):
            features = extractor(images.to(device))  # (B, D)
            if features.shape != (len(images), extractor.feature_dim):
                raise ValueError(
                    f"extractor returned {tuple(features.shape)} for {len(images)} images, "
                    f"expected (B, {extractor.feature_dim})"
                )
            stats = stats.update(features)
            bar.update(len(images))
    return stats


def reference_statistics(
    reference: Iterable[ImageBatch] | None,
    extractor: FeatureExtractor,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    cache: str | Path | None = None,
    source: str | None = None,
    total: int | None = None,
    progress: bool = True,
) -> FeatureStatistics:
    """Gathered statistics of the reference set, read from ``cache`` if it exists (made by the same
    extractor, from the same ``source`` when both name one), else computed and written there by rank 0."""
    if cache is not None and Path(cache).is_file():
        return FeatureStatistics.load(cache, extractor=extractor.description, source=source).to(device)
    if reference is None:
        where = f" and no cached statistics at {cache}" if cache is not None else ""
        raise UserError(f"no reference images{where}")
    stats = gather(feature_statistics(reference, extractor, batch_size, device, total, progress, "reference"))
    if cache is not None and _rank() == 0:
        stats.save(cache, source=source or "")
    return stats


def compute_fid(
    generated: Iterable[ImageBatch],
    reference: Iterable[ImageBatch] | None,
    extractor: FeatureExtractor,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    reference_cache: str | Path | None = None,
    progress: bool = True,
) -> float:
    """FID between two sets of uint8 image batches ((B, H, W, 3) numpy or (B, 3, H, W) tensors).

    ``reference`` may be None when ``reference_cache`` holds its statistics; otherwise they are
    written there. Under ``torch.distributed`` each rank passes its own share of both sets.
    """
    ref = reference_statistics(reference, extractor, batch_size, device, reference_cache, progress=progress)
    gen = gather(feature_statistics(generated, extractor, batch_size, device, progress=progress, desc="generated"))
    return frechet_distance(gen, ref)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
