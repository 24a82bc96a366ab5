"""FID: streaming statistics, the distance against closed forms and scipy, distributed gathering,
the cache file, the Inception-v3 extractor (random weights) and the image readers."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import Tensor, nn
from torchvision.models.inception import InceptionA, InceptionC, InceptionE

from ldm.checkpoints import save_safetensors
from ldm.errors import UserError
from ldm.evaluation.fid import (
    ImageSet,
    InceptionV3Features,
    FeatureStatistics,
    StatisticsMismatchError,
    build_inception_v3,
    compute_fid,
    feature_statistics,
    frechet_distance,
    gather,
    rebatch,
    resize_images,
)


class ColourStats(nn.Module):
    """A cheap deterministic extractor: per-channel mean and std of the pixels, (B, 6)."""

    feature_dim = 6
    description = "colour-stats-v1"

    def forward(self, images: Tensor) -> Tensor:
        x = images.float().flatten(2) / 255  # (B, 3, H*W)
        return torch.cat([x.mean(-1), x.std(-1)], dim=1)  # (B, 6)


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


def test_fid_of_full_covariances_matches_scipy_sqrtm() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    for d in (3, 20):
        mats = [rng.normal(size=(d, d)) for _ in range(2)]
        cov_a, cov_b = (m @ m.T + 0.1 * np.eye(d) for m in mats)
        mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
        expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
        a = FeatureStatistics.from_moments(torch.from_numpy(mu_a), torch.from_numpy(cov_a), count=10)
        b = FeatureStatistics.from_moments(torch.from_numpy(mu_b), torch.from_numpy(cov_b), count=10)
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


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


# --------------------------------------------------------------------------- Inception-v3
@pytest.fixture(scope="module")
def inception() -> InceptionV3Features:
    return InceptionV3Features(weights=None)


def test_random_inception_features_of_odd_sized_uint8_images(inception: InceptionV3Features) -> None:
    images = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8)
    with torch.inference_mode():
        features = inception(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and not torch.equal(features[0], features[1])
    assert "random-init" in inception.description and inception.feature_dim == 2048


def test_fid_blocks_differ_from_torchvision_only_in_the_pool_branch() -> None:
    """The FID graph's blocks are torchvision's with TensorFlow's pooling: with equal weights the
    outputs agree except in the pool branch, at the border (padding left out of the mean) or, in
    Mixed_7c, everywhere (max pool)."""
    fid = build_inception_v3("fid")
    cases = [  # (FID block, torchvision block, pool branch channels, pool differs inside too)
        (fid.Mixed_5b, InceptionA(192, pool_features=32), 32, False),
        (fid.Mixed_6b, InceptionC(768, channels_7x7=128), 192, False),
        (fid.Mixed_7b, InceptionE(1280), 192, False),
        (fid.Mixed_7c, InceptionE(2048), 192, True),
    ]
    g = torch.Generator().manual_seed(0)
    for fid_block, tv_block, pool_channels, differs_inside in cases:
        tv_block.load_state_dict(fid_block.state_dict())
        fid_block.eval()
        tv_block.eval()
        x = torch.rand(1, tv_block.branch1x1.conv.in_channels, 6, 6, generator=g)
        with torch.no_grad():
            ours, theirs = fid_block(x), tv_block(x)
        assert torch.equal(ours[:, :-pool_channels], theirs[:, :-pool_channels])
        inside_ours, inside_theirs = ours[:, -pool_channels:, 1:-1, 1:-1], theirs[:, -pool_channels:, 1:-1, 1:-1]
        assert torch.allclose(inside_ours, inside_theirs, atol=1e-6) != differs_inside
        assert not torch.allclose(ours[:, -pool_channels:], theirs[:, -pool_channels:], atol=1e-6)
    assert fid.fc.out_features == 1008 and build_inception_v3("torchvision").fc.out_features == 1000


def test_inception_weights_load_from_a_file_and_the_wrong_variant_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = build_inception_v3("fid")
    save_safetensors(net.state_dict(), tmp_path / "pt_inception.safetensors")
    loaded = InceptionV3Features(tmp_path / "pt_inception.safetensors")
    assert torch.equal(loaded.net.Mixed_7c.branch_pool.conv.weight, net.Mixed_7c.branch_pool.conv.weight)
    assert "sha256:" in loaded.description and "inception_v3-fid" in loaded.description
    with pytest.raises(UserError, match="--fid-variant fid"):
        InceptionV3Features(tmp_path / "pt_inception.safetensors", variant="torchvision")
    with pytest.raises(FileNotFoundError):
        InceptionV3Features(tmp_path / "missing.pth")


def test_resize_matches_pil_bicubic_on_float_images() -> None:
    """clean-fid resizes each channel as a PIL float ('F') image with bicubic filtering, then clips."""
    rng = np.random.default_rng(0)
    for height, width in ((37, 53), (400, 300)):
        channel = rng.integers(0, 256, (height, width)).astype(np.float32)
        pil = np.asarray(Image.fromarray(channel, mode="F").resize((299, 299), Image.Resampling.BICUBIC))
        ours = resize_images(torch.from_numpy(channel)[None, None], 299)[0, 0].numpy()
        assert ours.min() >= 0 and ours.max() <= 255 and (pil < 0).any()  # the overshoot is clipped
        assert np.abs(ours - np.clip(pil, 0, 255)).max() < 0.02


# --------------------------------------------------------------------------- batches and readers
def test_rebatch_accepts_numpy_and_torch_and_splits_at_size_changes() -> None:
    small = np.zeros((3, 8, 8, 3), np.uint8)  # (B, H, W, 3) numpy
    large = torch.zeros(4, 3, 9, 9, dtype=torch.uint8)  # (B, 3, H, W) torch
    shapes = [tuple(batch.shape) for batch in rebatch([small, small, large], batch_size=4)]
    assert shapes == [(4, 3, 8, 8), (2, 3, 8, 8), (4, 3, 9, 9)]
    with pytest.raises(TypeError, match="uint8"):
        list(rebatch([torch.zeros(1, 3, 8, 8)], 4))
    with pytest.raises(ValueError, match="B, H, W, 3"):
        list(rebatch([np.zeros((1, 3, 8, 8), np.uint8)], 4))


def _images(n: int, seed: int, size: tuple[int, int] = (16, 24)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _write_folder(folder: Path, images: list[np.ndarray], metadata: bool) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    if metadata:
        Image.fromarray(images[0]).save(folder / "grid.png")  # a preview, not a sample
        rows = [{"file": f"{i:03d}.png", "prompt": "p"} for i in range(len(images))]
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _write_shard(path: Path, images: list[np.ndarray]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(images):
            for name, data in ((f"{i:03d}.png", _png(image)), (f"{i:03d}.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_folders_and_shards_read_the_same_images_and_fid_uses_the_cache(tmp_path: Path) -> None:
    samples, reference = _images(9, seed=0), _images(7, seed=1, size=(20, 20))
    _write_folder(tmp_path / "samples", samples, metadata=True)
    _write_folder(tmp_path / "reference", reference, metadata=False)
    _write_shard(tmp_path / "ref-000.tar", reference[:4])
    _write_shard(tmp_path / "ref-001.tar", reference[4:])
    extractor = ColourStats()

    folder_set = ImageSet(str(tmp_path / "samples"), batch_size=4)
    assert folder_set.count() == 9  # metadata.jsonl lists the samples, grid.png is left out
    stacked = np.concatenate(list(folder_set))
    assert stacked.shape == (9, 16, 24, 3) and np.array_equal(stacked, np.stack(samples))
    from_folder = feature_statistics(ImageSet(str(tmp_path / "reference")), extractor, progress=False)
    from_shards = feature_statistics(ImageSet(str(tmp_path / "ref-{000..001}.tar"), 3), extractor, progress=False)
    torch.testing.assert_close(from_folder.mean, from_shards.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_folder.m2, from_shards.m2, rtol=1e-12, atol=1e-12)
    # ranks split a set: r, r + W, ...
    halves = [np.concatenate(list(ImageSet(str(tmp_path / "ref-*.tar"), 2, rank, 2))) for rank in (0, 1)]
    assert np.array_equal(halves[0], np.stack(reference[0::2])) and np.array_equal(halves[1], np.stack(reference[1::2]))

    assert abs(compute_fid(folder_set, folder_set, extractor, progress=False)) < 1e-6
    cache = tmp_path / "ref_stats.npz"
    references = ImageSet(str(tmp_path / "reference"))
    fid = compute_fid(folder_set, references, extractor, reference_cache=cache, progress=False)
    assert fid > 0 and cache.is_file()
    cached = compute_fid(folder_set, None, extractor, batch_size=2, reference_cache=cache, progress=False)
    assert cached == pytest.approx(fid, rel=1e-10)
    # batches of uint8 tensors or numpy arrays of any batch size give the same number
    tensors = [torch.from_numpy(np.stack(samples[i : i + 2])).permute(0, 3, 1, 2) for i in range(0, 9, 2)]
    from_tensors = compute_fid(tensors, None, extractor, batch_size=5, reference_cache=cache, progress=False)
    assert from_tensors == pytest.approx(fid, rel=1e-10)
    with pytest.raises(UserError, match="no reference images"):
        compute_fid(folder_set, None, extractor, reference_cache=tmp_path / "absent.npz", progress=False)
