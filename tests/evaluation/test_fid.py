"""FID from image batches: the streamed pipeline against statistics of all features at once, the
reference cache (written, reused, refused for another extractor), any batch layout, one-line errors.
The same pipeline with the Inception network equals pytorch-fid's FID (test_metrics.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_fid_reference import ImageFolders
from torch import Tensor, nn

from ldm.errors import UserError
from ldm.evaluation.fid import compute_fid, feature_statistics, reference_statistics
from ldm.evaluation.fid_statistics import FeatureStatistics, StatisticsMismatchError, frechet_distance
from ldm.evaluation.image_sets import ImageSet


class ColourStats(nn.Module):
    """A cheap deterministic extractor: per-channel mean and std of the pixels, (B, 6)."""

    feature_dim = 6
    description = "colour-stats-v1"

    def forward(self, images: Tensor) -> Tensor:
        x = images.float().flatten(2) / 255  # (B, 3, H*W)
        return torch.cat([x.mean(-1), x.std(-1)], dim=1)  # (B, 6)


def _all_images(folder: Path) -> Tensor:
    return torch.cat([torch.from_numpy(batch).permute(0, 3, 1, 2) for batch in ImageSet(str(folder))])  # (N, 3, H, W)


def test_streamed_fid_equals_the_distance_of_all_features_at_once(image_folders: ImageFolders) -> None:
    extractor = ColourStats()
    samples, reference = ImageSet(str(image_folders.samples), batch_size=3), ImageSet(str(image_folders.reference))
    expected = frechet_distance(
        FeatureStatistics.from_features(extractor(_all_images(image_folders.samples))),
        FeatureStatistics.from_features(extractor(_all_images(image_folders.reference))),
    )
    fid = compute_fid(samples, reference, extractor, batch_size=3, progress=False)  # batches of 3 + 1
    assert expected > 0.01 and fid == pytest.approx(expected, rel=1e-10)
    assert abs(compute_fid(samples, samples, extractor, progress=False)) < 1e-9


def test_reference_cache_is_written_reused_and_refused_for_another_extractor(
    tmp_path: Path, image_folders: ImageFolders
) -> None:
    extractor, samples = ColourStats(), ImageSet(str(image_folders.samples))
    cache = tmp_path / "ref_stats.npz"
    fid = compute_fid(samples, ImageSet(str(image_folders.reference)), extractor, reference_cache=cache, progress=False)
    assert fid > 0 and cache.is_file()
    cached = compute_fid(samples, None, extractor, batch_size=2, reference_cache=cache, progress=False)
    assert cached == pytest.approx(fid, rel=1e-10)
    # batches of uint8 tensors or numpy arrays of any batch size give the same number
    images = _all_images(image_folders.samples)
    tensors = [images[i : i + 3] for i in range(0, len(images), 3)]
    numpy = [images.permute(0, 2, 3, 1).numpy()]
    for batches in (tensors, numpy):
        assert compute_fid(batches, None, extractor, batch_size=5, reference_cache=cache, progress=False) == (
            pytest.approx(fid, rel=1e-10)
        )
    other = ColourStats()
    other.description = "colour-stats-v2"
    with pytest.raises(StatisticsMismatchError, match="delete it to recompute"):
        reference_statistics(None, other, cache=cache, progress=False)
    with pytest.raises(UserError, match="no reference images"):
        compute_fid(samples, None, extractor, reference_cache=tmp_path / "absent.npz", progress=False)


def test_an_extractor_of_the_wrong_shape_is_named() -> None:
    class Wrong(ColourStats):
        def forward(self, images: Tensor) -> Tensor:
            return super().forward(images)[:, :5]

    with pytest.raises(ValueError, match=r"expected \(B, 6\)"):
        feature_statistics([np.zeros((2, 8, 8, 3), np.uint8)], Wrong(), progress=False)
