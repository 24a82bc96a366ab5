"""FID statistics: streaming moments against numpy, the distance against closed forms and pytorch-fid,
exact gathering across ranks, and the cache file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_fid.fid_score import calculate_frechet_distance
from torch import Tensor

from ldm.evaluation.fid_statistics import FeatureStatistics, StatisticsMismatchError, frechet_distance, gather


def _random_features(n: int, d: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing + 3.0  # correlated, off-centre


def _split(x: Tensor, sizes: list[int]) -> list[Tensor]:
    return list(torch.split(x, sizes))


# --------------------------------------------------------------------------- statistics
def test_streaming_statistics_equal_numpy_mean_and_cov() -> None:
    features = _random_features(103, 7)
    expected_mean, expected_cov = features.numpy().mean(axis=0), np.cov(features.numpy(), rowvar=False)
    stats = FeatureStatistics.empty(7)
    for batch in _split(features, [1, 10, 32, 0, 60]):  # uneven, a single row, an empty batch
        stats = stats.update(batch)
    assert stats.count == 103 and stats.mean.dtype == torch.float64
    np.testing.assert_allclose(stats.mean.numpy(), expected_mean, rtol=1e-13)
    np.testing.assert_allclose(stats.covariance.numpy(), expected_cov, rtol=1e-12)
    # float32 features (what extractors return) are accumulated in float64
    single = FeatureStatistics.empty(7)
    for batch in _split(features.float(), [50, 53]):
        single = single.update(batch)
    as_float32 = features.float().double().numpy()
    np.testing.assert_allclose(single.covariance.numpy(), np.cov(as_float32, rowvar=False), rtol=1e-12)


def test_merge_is_associative_and_empty_is_its_identity() -> None:
    parts = [FeatureStatistics.from_features(x) for x in _split(_random_features(60, 5), [10, 20, 30])]
    left = parts[0].merge(parts[1]).merge(parts[2])
    right = parts[0].merge(parts[1].merge(parts[2]))
    torch.testing.assert_close(left.mean, right.mean, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(left.m2, right.m2, rtol=1e-13, atol=1e-12)
    empty = FeatureStatistics.empty(5)
    assert empty.merge(left).count == left.count and torch.equal(left.merge(empty).m2, left.m2)
    with pytest.raises(StatisticsMismatchError):
        FeatureStatistics.empty(5, "a").update(torch.ones(2, 5)).merge(FeatureStatistics.empty(5, "b"))


# --------------------------------------------------------------------------- the distance
@pytest.mark.parametrize("n, d", [(500, 16), (12, 40)], ids=["full-rank", "rank-deficient"])
def test_fid_of_a_set_with_itself_is_zero(n: int, d: int) -> None:
    stats = FeatureStatistics.from_features(_random_features(n, d) * 10)
    assert abs(frechet_distance(stats, stats)) < 1e-6


def test_fid_of_diagonal_gaussians_matches_the_closed_form() -> None:
    # commuting covariances: Tr(C_a + C_b - 2 (C_a C_b)^1/2) = sum_i (sqrt(a_i) - sqrt(b_i))^2
    mean_a, mean_b = torch.tensor([0.0, 1.0, 2.0, -1.0]), torch.tensor([1.0, 1.0, 0.0, 3.0])
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25, 9.0]), torch.tensor([4.0, 1.0, 0.25, 0.0])  # one degenerate
    a = FeatureStatistics.from_moments(mean_a, torch.diag(var_a), count=1000)
    b = FeatureStatistics.from_moments(mean_b, torch.diag(var_b), count=1000)
    expected = float(((mean_a - mean_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_fid_of_full_covariances_matches_pytorch_fid() -> None:
    """pytorch-fid's ``calculate_frechet_distance`` (scipy's sqrtm of C_a C_b), full-rank covariances.

    ``count=10`` understates their rank: the low-rank factor sees the missed energy and falls back."""
    rng = np.random.default_rng(0)
    for d in (3, 20, 200):
        mats = [rng.normal(size=(d, d)) for _ in range(2)]
        cov_a, cov_b = (m @ m.T + 0.1 * np.eye(d) for m in mats)
        mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
        expected = calculate_frechet_distance(mu_a, cov_a, mu_b, cov_b)
        a = FeatureStatistics.from_moments(torch.from_numpy(mu_a), torch.from_numpy(cov_a), count=10)
        b = FeatureStatistics.from_moments(torch.from_numpy(mu_b), torch.from_numpy(cov_b), count=10)
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n, d", [(12, 40), (5, 2048)])
def test_fid_of_rank_deficient_covariances_matches_the_closed_form(n: int, d: int) -> None:
    # b = c a + s: C_b = c^2 C_a, so (C_a C_b)^1/2 = c C_a and FID = ||mu_a - mu_b||^2 + (1 - c)^2 Tr C_a,
    # with n < d samples (rank n - 1): where sqrtm of the singular product is inexact
    a_features = _random_features(n, d) / d**0.5
    shift = torch.linspace(-1, 1, d, dtype=torch.float64)
    for scale in (1.0, 0.5, 3.0):
        a = FeatureStatistics.from_features(a_features)
        b = FeatureStatistics.from_features(scale * a_features + shift)
        expected = float(((a.mean - b.mean) ** 2).sum() + (1 - scale) ** 2 * a.covariance.trace())
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10, abs=1e-9)


def test_fid_of_sampled_gaussians_approaches_the_closed_form() -> None:
    g = torch.Generator().manual_seed(1)
    n = 200_000
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0])  # N(0, diag(1, 4))
    y = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0]) + torch.tensor([1.0, -1.0])
    expected = 2.0 + (1 - 3) ** 2 + (2 - 1) ** 2  # ||mu||^2 + sum (sqrt a - sqrt b)^2 = 7
    a = FeatureStatistics.empty(2)
    for chunk in torch.split(x, 4096):
        a = a.update(chunk)
    assert frechet_distance(a, FeatureStatistics.from_features(y)) == pytest.approx(expected, rel=0.01)


# --------------------------------------------------------------------------- distributed
def _gather_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        batches = _split(_random_features(101, 9), [7, 30, 1, 20, 43])
        stats = FeatureStatistics.empty(9, "x")
        for batch in batches[rank::world_size]:  # rank 0: 7 + 1 + 43 rows, rank 1: 30 + 20
            stats = stats.update(batch)
        gather(stats).save(Path(out_dir) / f"rank{rank}.npz")
    finally:
        dist.destroy_process_group()


def test_gather_across_two_gloo_ranks_equals_one_process(tmp_path: Path) -> None:
    # fork: the ranks start at once, without re-importing torch and this module (~10 s under load)
    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    single = FeatureStatistics.from_features(_random_features(101, 9), "x")
    for rank in (0, 1):
        gathered = FeatureStatistics.load(tmp_path / f"rank{rank}.npz", extractor="x")
        assert gathered.count == 101
        torch.testing.assert_close(gathered.mean, single.mean, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(gathered.covariance, single.covariance, rtol=1e-12, atol=1e-12)


def test_gather_is_the_identity_without_a_process_group() -> None:
    stats = FeatureStatistics.from_features(_random_features(5, 3))
    assert gather(stats) is stats


# --------------------------------------------------------------------------- cache files
def test_cache_round_trips_and_refuses_another_extractor_or_source(tmp_path: Path) -> None:
    stats = FeatureStatistics.from_features(_random_features(40, 6), "inception_v3-fid sha256:abc")
    path = tmp_path / "sub" / "ref.npz"
    stats.save(path, source="/data/coco")
    loaded = FeatureStatistics.load(path, extractor="inception_v3-fid sha256:abc", source="/data/coco")
    assert loaded.count == 40 and loaded.extractor == stats.extractor
    torch.testing.assert_close(loaded.mean, stats.mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded.covariance, stats.covariance, rtol=1e-15, atol=0)
    with np.load(path) as data:  # pytorch-fid's key names
        assert data["mu"].shape == (6,) and data["sigma"].shape == (6, 6)
    with pytest.raises(StatisticsMismatchError, match="delete it to recompute"):
        FeatureStatistics.load(path, extractor="inception_v3-torchvision sha256:def")
    with pytest.raises(StatisticsMismatchError, match="/data/coco"):
        FeatureStatistics.load(path, extractor=stats.extractor, source="/data/other")
    with pytest.raises(FileNotFoundError):
        FeatureStatistics.load(tmp_path / "missing.npz")
