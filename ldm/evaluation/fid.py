"""Fréchet Inception Distance: feature statistics, the distance, the Inception-v3 extractor and readers.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") fits a Gaussian to the Inception-v3 pool features (2048-d) of each image set and
reports the Fréchet distance ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^{1/2}).

Weights (a local file; nothing here downloads). The standard FID network is TensorFlow's
Inception-v3 of 2015-12-05 as ported by pytorch-fid: ``pt_inception-2015-12-05-6726825d.pth``
(~92 MB) from ``FID_WEIGHTS_URL`` (torch-fidelity ships the same port). Its graph differs from
torchvision's Inception-v3 in three places, all rebuilt here (``variant="fid"``, the default):
1008 output classes, average pools that leave the zero padding out of the mean (TensorFlow's
behaviour) in the Mixed_5*, Mixed_6b-e and Mixed_7b blocks, and a max pool instead of an average
pool in the last block (Mixed_7c). ``variant="torchvision"`` runs torchvision's own graph with its
ImageNet weights (``inception_v3_google-0cc3c7bd.pth`` from download.pytorch.org): a non-standard
"FID-torchvision" that does not compare with published FIDs.

Preprocessing follows clean-fid (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties
in GAN Evaluation"): uint8 images become float, are resized to 299x299 with antialiased bicubic
filtering in float (matching clean-fid's PIL float resize to ~0.01 grey levels) and clamped to
[0, 255]; then, as inside the TensorFlow graph, x -> (x - 128) / 128. pytorch-fid resizes
bilinearly without antialiasing and scales by 2x/255 - 1, so its numbers differ slightly from these.

Statistics are streamed in float64 (count, mean and centred scatter, merged by Chan et al. 1979),
gathered exactly across ``torch.distributed`` ranks (``gather``), and cached to ``.npz`` files that
record the extractor they came from (``mu``/``sigma`` as in pytorch-fid's files, plus ``count``,
``extractor`` and ``source``); a cache made by another extractor is refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.models import inception_v3
from torchvision.models.inception import (
    BasicConv2d,
    Inception3,
    InceptionA,
    InceptionAux,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)
from tqdm import tqdm

from ldm.checkpoints import load_state_dict_file, resolve_path
from ldm.data.shards import expand_shards
from ldm.errors import UserError
from ldm.jsonl import jsonl_rows

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_SIZE = 299  # the input resolution Inception-v3 was trained at
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FINGERPRINT_BYTES = 64 * 2**20  # files are identified by size + sha256 of their first 64 MiB
INCEPTION_VARIANTS = {"fid": 1008, "torchvision": 1000}  # variant -> classes of its final layer

ImageBatch = np.ndarray | Tensor  # uint8: (B, H, W, 3) numpy or (B, 3, H, W) torch


class StatisticsMismatchError(UserError, ValueError):
    """Cached statistics that were computed by another extractor or from another image set."""


class FeatureExtractor(Protocol):
    """uint8 images (B, 3, H, W) -> features (B, feature_dim), any float dtype and device.

    ``description`` names the network, its weights and its preprocessing: cached statistics are
    reused only by an extractor with an equal description. Any ``nn.Module`` with these two
    attributes fits (random-weight test extractors, CLIP image towers for FD-CLIP, ...).
    """

    feature_dim: int
    description: str

    def __call__(self, images: Tensor) -> Tensor: ...


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureStatistics:
    """Count, mean and centred scatter of a set of feature vectors, in float64.

    ``m2 = sum_i (x_i - mean)(x_i - mean)^T``; ``covariance = m2 / (count - 1)`` (unbiased, as
    ``np.cov`` and pytorch-fid). ``extractor`` is the description of the features' extractor.
    """

    count: int
    mean: Tensor  # (D,) float64
    m2: Tensor  # (D, D) float64
    extractor: str = ""

    @classmethod
    def empty(cls, dim: int, extractor: str = "", device: torch.device | str = "cpu") -> FeatureStatistics:
        """The statistics of no features (the identity of ``merge``)."""
        zeros = torch.zeros(dim, dtype=torch.float64, device=device)
        return cls(0, zeros, torch.zeros(dim, dim, dtype=torch.float64, device=device), extractor)

    @classmethod
    def from_features(cls, features: Tensor, extractor: str = "") -> FeatureStatistics:
        """Statistics of a (N, D) batch, computed in float64 on its device."""
        if features.ndim != 2:
            raise ValueError(f"expected features of shape (N, D), got {tuple(features.shape)}")
        x = features.detach().to(torch.float64)  # (N, D)
        mean = x.mean(dim=0)  # (D,)
        centred = x - mean  # (N, D)
        return cls(x.shape[0], mean, centred.T @ centred, extractor)

    @classmethod
    def from_moments(cls, mean: Tensor, covariance: Tensor, count: int, extractor: str = "") -> FeatureStatistics:
        """Statistics with a given mean (D,) and covariance (D, D) as if from ``count`` >= 2 samples."""
        if count < 2:
            raise ValueError(f"a covariance needs count >= 2, got {count}")
        mean = torch.as_tensor(mean, dtype=torch.float64)
        covariance = torch.as_tensor(covariance, dtype=torch.float64)
        return cls(int(count), mean, covariance * (count - 1), extractor)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def covariance(self) -> Tensor:
        """(D, D) float64 unbiased covariance."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, have {self.count}")
        return self.m2 / (self.count - 1)

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Statistics of the union of both sets (Chan, Golub & LeVeque 1979, pairwise update)."""
        if self.dim != other.dim:
            raise ValueError(f"cannot merge statistics of {self.dim}-d and {other.dim}-d features")
        if self.extractor and other.extractor and self.extractor != other.extractor:
            raise StatisticsMismatchError(f"cannot merge features of {self.extractor!r} and {other.extractor!r}")
        extractor = self.extractor or other.extractor
        if other.count == 0:
            return FeatureStatistics(self.count, self.mean, self.m2, extractor)
        if self.count == 0:
            return FeatureStatistics(other.count, other.mean, other.m2, extractor)
        count = self.count + other.count
        delta = other.mean.to(self.mean.device) - self.mean  # (D,)
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2.to(self.m2.device) + torch.outer(delta, delta) * (self.count * other.count / count)
        return FeatureStatistics(count, mean, m2, extractor)

    def update(self, features: Tensor) -> FeatureStatistics:
        """These statistics merged with those of a (N, D) batch."""
        return self.merge(FeatureStatistics.from_features(features.to(self.mean.device), self.extractor))

    def to(self, device: torch.device | str) -> FeatureStatistics:
        return FeatureStatistics(self.count, self.mean.to(device), self.m2.to(device), self.extractor)

    def save(self, path: str | Path, source: str = "") -> None:
        """Write an ``.npz`` cache (atomically): ``mu``, ``sigma``, ``count``, ``extractor``, ``source``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as file:  # a file object: np.savez would append .npz to a name
            np.savez(
                file,
                mu=self.mean.cpu().numpy(),
                sigma=self.covariance.cpu().numpy(),
                count=np.int64(self.count),
                extractor=np.str_(self.extractor),
                source=np.str_(source),
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, extractor: str | None = None, source: str | None = None) -> FeatureStatistics:
        """Read a cache written by ``save``; refuse it if ``extractor`` (or a recorded ``source``) differs."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file not found: {path}")
        with np.load(path, allow_pickle=False) as data:
            if not {"mu", "sigma", "count", "extractor"} <= set(data.files):
                raise StatisticsMismatchError(f"{path} is not an ldm statistics file (no mu, sigma, count, extractor)")
            stored, stored_source = str(data["extractor"]), str(data["source"]) if "source" in data.files else ""
            if extractor is not None and stored != extractor:
                raise StatisticsMismatchError(
                    f"{path} was computed by extractor {stored!r}, not {extractor!r}: delete it to recompute"
                )
            if source is not None and stored_source and stored_source != source:
                raise StatisticsMismatchError(
                    f"{path} was computed from {stored_source!r}, not {source!r}: delete it to recompute"
                )
            mean, covariance = torch.from_numpy(data["mu"]), torch.from_numpy(data["sigma"])
            return cls.from_moments(mean, covariance, int(data["count"]), stored)


def gather(stats: FeatureStatistics, group: Any = None) -> FeatureStatistics:
    """Statistics of every rank's features together (the identity without ``torch.distributed``).

    Exact up to float64 summation order: the counts and sums are all-reduced into the global mean,
    then each rank's scatter about that mean, ``m2_r + n_r (mu_r - mu)(mu_r - mu)^T``, is summed.
    Every rank of ``group`` must call it; a rank without features passes ``FeatureStatistics.empty``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    count = torch.tensor([stats.count], dtype=torch.int64, device=device)
    dist.all_reduce(count, group=group)
    total = int(count.item())
    if total == 0:
        return stats
    local_mean = stats.mean.to(device)
    mean = local_mean * stats.count  # (D,) this rank's sum
    dist.all_reduce(mean, group=group)
    mean /= total
    delta = local_mean - mean  # (D,)
    m2 = stats.m2.to(device) + torch.outer(delta, delta) * stats.count  # (D, D) scatter about the global mean
    dist.all_reduce(m2, group=group)
    return FeatureStatistics(total, mean.to(stats.mean.device), m2.to(stats.m2.device), stats.extractor)


def _psd_factor(matrix: Tensor) -> Tensor:
    """A factor L with L L^T = matrix (symmetric PSD): Cholesky when it succeeds (full rank, fast),
    else the symmetric square root, with rounding's tiny negative eigenvalues clamped to 0."""
    matrix = (matrix + matrix.T) / 2
    factor, info = torch.linalg.cholesky_ex(matrix)
    if info.item() == 0:
        return factor
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^{1/2}) (Heusel et al. 2017), in float64.

    With factors C_a = L_a L_a^T and C_b = L_b L_b^T, Tr((C_a C_b)^{1/2}) is the sum of the
    singular values (nuclear norm) of L_a^T L_b: (L_a^T L_b)^T (L_a^T L_b) = L_b^T C_a L_b has the
    eigenvalues of C_a C_b. Singular values are accurate to ~eps ||.||, where eigenvalues of the
    product would need square roots of rounding noise: rank-deficient covariances (fewer images than
    feature dimensions) stay exact, e.g. a set against itself gives 0 to ~1e-12.
    """
    if a.dim != b.dim:
        raise ValueError(f"statistics of {a.dim}-d and {b.dim}-d features do not compare")
    if a.extractor and b.extractor and a.extractor != b.extractor:
        raise StatisticsMismatchError(f"statistics of different extractors: {a.extractor!r} and {b.extractor!r}")
    device = a.mean.device
    cov_a, cov_b = a.covariance, b.covariance.to(device)  # (D, D)
    trace_sqrt = torch.linalg.svdvals(_psd_factor(cov_a).T @ _psd_factor(cov_b)).sum()
    diff = a.mean - b.mean.to(device)  # (D,)
    return float(diff @ diff + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


# ---------------------------------------------------------------------------------------------
# Inception-v3
# ---------------------------------------------------------------------------------------------
def _tf_avg_pool(x: Tensor) -> Tensor:
    """3x3 average pool as TensorFlow computes it: padded zeros are left out of the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _FIDInceptionA(InceptionA):
    """torchvision's InceptionA with TensorFlow's average pool."""

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_tf_avg_pool(x))]


class _FIDInceptionC(InceptionC):
    """torchvision's InceptionC with TensorFlow's average pool."""

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_tf_avg_pool(x))]


class _FIDInceptionE(InceptionE):
    """torchvision's InceptionE with TensorFlow's average pool, or a max pool (the FID graph's Mixed_7c)."""

    def __init__(self, in_channels: int, conv_block: Callable[..., nn.Module] | None = None, max_pool: bool = False):
        super().__init__(in_channels, conv_block)
        self.pool = _max_pool if max_pool else _tf_avg_pool

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(self.pool(x))]


def build_inception_v3(variant: str = "fid") -> Inception3:
    """torchvision's Inception-v3 graph (default init, no aux head) for ``variant``, ready for its weights.

    ``"fid"``: the graph of ``pt_inception-2015-12-05-6726825d.pth`` (1008 classes, TensorFlow
    pooling); ``"torchvision"``: torchvision's own graph (1000 classes). Parameter names are
    torchvision's in both, so either weights file loads with ``load_state_dict``.
    """
    if variant not in INCEPTION_VARIANTS:
        raise ValueError(f"Inception variant must be one of {sorted(INCEPTION_VARIANTS)}, got {variant!r}")
    if variant == "torchvision":
        return inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    blocks = [BasicConv2d, _FIDInceptionA, InceptionB, _FIDInceptionC, InceptionD, _FIDInceptionE, InceptionAux]
    net = inception_v3(
        weights=None, aux_logits=False, init_weights=False, transform_input=False,
        num_classes=INCEPTION_VARIANTS["fid"], inception_blocks=blocks,
    )  # fmt: skip
    net.Mixed_7c = _FIDInceptionE(2048, max_pool=True)
    return net


def resize_images(images: Tensor, size: int | tuple[int, int], high: float = 255.0) -> Tensor:
    """Float images (B, C, H, W) in [0, high] -> (B, C, *size), bicubic with antialiasing, clamped.

    Resizing in float with an antialiased kernel is clean-fid's convention; it matches PIL's bicubic
    resize of float images (clean-fid's implementation) to ~1e-3 of 255.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    resized = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(0, high)


class InceptionV3Features(nn.Module):
    """Inception-v3 pool3 features for FID: uint8 images (B, 3, H, W) of any size -> (B, 2048) float32.

    weights: a local ``pt_inception-2015-12-05-6726825d.pth`` (variant ``"fid"``, the standard) or
        torchvision's ``inception_v3_google-0cc3c7bd.pth`` (variant ``"torchvision"``); ``.pth`` or
        ``.safetensors``. None keeps a seeded random init (``init_seed``): tests only, and the
        description says so.
    """

    feature_dim = 2048

    def __init__(self, weights: str | Path | None, variant: str = "fid", init_seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)  # the random test network is the same wherever it is rebuilt
            net = build_inception_v3(variant)
        if weights is None:
            identity = f"random-init-seed{init_seed}"
        else:
            _load_inception_weights(net, weights, variant)
            identity = "sha256:" + file_fingerprint(weights)["sha256_first_64MiB"][:16]
        net.fc = nn.Identity()  # stop at the 2048-d average pool ("pool3")
        self.net = net.requires_grad_(False).eval()
        self.variant = variant
        self.description = f"inception_v3-{variant} {identity} 299px-bicubic-antialias-float pool3"

    def forward(self, images: Tensor) -> Tensor:
        x = images.to(self.net.Conv2d_1a_3x3.conv.weight.device, torch.float32)  # (B, 3, H, W) in [0, 255]
        x = resize_images(x, INCEPTION_SIZE)  # (B, 3, 299, 299)
        x = (x - 128) / 128  # as the TensorFlow graph's first op does (~[-1, 1])
        return self.net(x)  # (B, 2048)


def _load_inception_weights(net: Inception3, weights: str | Path, variant: str) -> None:
    state = load_state_dict_file(weights)  # FileNotFoundError names the path
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}  # torchvision's files have one
    classes = state["fc.weight"].shape[0] if "fc.weight" in state else None
    wanted = INCEPTION_VARIANTS[variant]
    if classes is not None and classes != wanted:
        other = next((name for name, n in INCEPTION_VARIANTS.items() if n == classes), None)
        hint = f" (these look like variant {other!r}: use --fid-variant {other})" if other else ""
        raise UserError(f"{weights}: an Inception-v3 with {classes} classes, variant {variant!r} needs {wanted}{hint}")
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise UserError(f"{weights} does not hold Inception-v3 weights ({first})") from error


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """{"path", "size", "sha256_first_64MiB"} of a file: enough to tell model files apart, quickly."""
    path = resolve_path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        remaining = FINGERPRINT_BYTES
        while remaining > 0 and (chunk := file.read(min(remaining, 2**20))):
            digest.update(chunk)
            remaining -= len(chunk)
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256_first_64MiB": digest.hexdigest()}


# ---------------------------------------------------------------------------------------------
# Images in, statistics out
# ---------------------------------------------------------------------------------------------
def as_image_tensor(batch: ImageBatch) -> Tensor:
    """A uint8 batch as (B, 3, H, W): numpy arrays are (B, H, W, 3), tensors already (B, 3, H, W)."""
    if isinstance(batch, np.ndarray):
        if batch.ndim != 4 or batch.shape[3] != 3:
            raise ValueError(f"expected numpy images of shape (B, H, W, 3), got {batch.shape}")
        batch = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    elif not isinstance(batch, Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
        shape = tuple(batch.shape) if hasattr(batch, "shape") else type(batch).__name__
        raise ValueError(f"expected image tensors of shape (B, 3, H, W), got {shape}")
    if batch.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {batch.dtype}")
    return batch


def rebatch(batches: Iterable[ImageBatch], batch_size: int) -> Iterator[Tensor]:
    """uint8 (B, 3, H, W) batches of ``batch_size`` (fewer at the end, or where the image size changes)."""
    pending: list[Tensor] = []
    count = 0
    for batch in batches:
        images = as_image_tensor(batch)
        if pending and images.shape[1:] != pending[0].shape[1:]:
            yield torch.cat(pending)
            pending, count = [], 0
        while len(images):
            take, images = images[: batch_size - count], images[batch_size - count :]
            pending.append(take)
            count += len(take)
            if count == batch_size:
                yield torch.cat(pending)
                pending, count = [], 0
    if pending:
        yield torch.cat(pending)


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
                raise ValueError(f"extractor returned {tuple(features.shape)} for {len(images)} images, "
                                 f"expected (B, {extractor.feature_dim})")  # fmt: skip
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


# ---------------------------------------------------------------------------------------------
# Readers: image folders and webdataset shards -> uint8 batches
# ---------------------------------------------------------------------------------------------
def read_metadata(folder: str | Path) -> list[dict[str, Any]] | None:
    """The rows of ``folder/metadata.jsonl`` (each with a ``file``), or None without one."""
    path = Path(folder) / "metadata.jsonl"
    if not path.is_file():
        return None
    rows = []
    for number, row in jsonl_rows(path):
        if not isinstance(row, dict) or "file" not in row:
            raise UserError(f"{path}:{number}: each line needs a 'file'")
        rows.append(row)
    return rows


def folder_images(folder: str | Path) -> list[Path]:
    """The images of a folder: those listed in its ``metadata.jsonl`` (in order), else every image
    file below it (sorted; a ``grid.png`` preview would be included, so keep the metadata)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise NotADirectoryError(f"no such image folder: {folder}")
    rows = read_metadata(folder)
    if rows is not None:
        paths = [folder / row["file"] for row in rows]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            listed = folder / "metadata.jsonl"
            raise FileNotFoundError(f"{len(missing)} image(s) listed in {listed} are missing, e.g. {missing[0]}")
    else:
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"no images in {folder}")
    return paths


def _decode_rgb(data: Path | bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file or its encoded bytes."""
    with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _stack_runs(images: list[np.ndarray]) -> Iterator[np.ndarray]:
    """(B, H, W, 3) stacks of consecutive images of one size, in order."""
    start = 0
    for end in range(1, len(images) + 1):
        if end == len(images) or images[end].shape != images[start].shape:
            yield np.stack(images[start:end])
            start = end


def read_images(sources: Iterable[Path | bytes], batch_size: int = 50, num_threads: int = 4) -> Iterator[np.ndarray]:
    """Decode image files (or encoded bytes) in order into uint8 (B, H, W, 3) batches, a batch's
    images decoded by ``num_threads`` threads; a change of image size starts a new batch."""
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        chunk: list[Path | bytes] = []
        for source in sources:
            chunk.append(source)
            if len(chunk) == batch_size:
                yield from _stack_runs(list(pool.map(_decode_rgb, chunk)))
                chunk = []
        if chunk:
            yield from _stack_runs(list(pool.map(_decode_rgb, chunk)))


def _shard_image_bytes(urls: Sequence[str], rank: int, world_size: int) -> Iterator[bytes]:
    """Encoded image members of tar shards, in order; rank r of W keeps images r, r + W, ..."""
    index = 0
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    if index % world_size == rank:
                        yield tar.extractfile(member).read()
                    index += 1


@dataclass(frozen=True)
class ImageSet:
    """A folder of images or webdataset shards, read as uint8 (B, H, W, 3) batches.

    ``spec`` is a folder (``metadata.jsonl`` aware, see ``folder_images``) or a shard spec
    (``expand_shards``: brace patterns, globs, lists). Rank r of W reads images r, r + W, ...
    ``len`` is this rank's image count for folders, None for shards (known only once read).
    """

    spec: str
    batch_size: int = 50
    rank: int = 0
    world_size: int = 1
    num_threads: int = 4

    @property
    def is_folder(self) -> bool:
        return Path(self.spec).expanduser().is_dir()

    @property
    def source(self) -> str:
        """What the set is, for cache files: the resolved folder or the shard spec."""
        return str(Path(self.spec).expanduser().resolve()) if self.is_folder else self.spec

    def paths(self) -> list[Path]:
        return folder_images(self.spec)[self.rank :: self.world_size]

    def count(self) -> int | None:
        return len(self.paths()) if self.is_folder else None

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.is_folder:
            sources: Iterable[Path | bytes] = self.paths()
        else:
            sources = _shard_image_bytes(expand_shards(self.spec), self.rank, self.world_size)
        return read_images(sources, self.batch_size, self.num_threads)
