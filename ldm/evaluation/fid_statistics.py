"""FID statistics: streamed float64 feature moments, their exact gathering across ranks, the cache
file, and the Fréchet distance.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") fits a Gaussian to the features of each image set and reports the Fréchet distance
||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^{1/2}).

Statistics are streamed in float64 (count, mean and centred scatter, merged by Chan et al. 1979),
gathered exactly across ``torch.distributed`` ranks (``gather``), and cached to ``.npz`` files that
record the extractor they came from (``mu``/``sigma`` as in pytorch-fid's files, plus ``count``,
``extractor`` and ``source``); a cache made by another extractor is refused.

The distance is ours, not pytorch-fid's ``calculate_frechet_distance`` (scipy's ``sqrtm`` of
C_a C_b): it runs in torch on the features' device and stays exact when a covariance is
rank-deficient (fewer images than feature dimensions), where ``sqrtm`` of the singular product is
not. Where both are exact they agree to ~1e-12 relative (tests/evaluation/test_fid_statistics.py;
bench/fid_distance.py measures both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ldm import atomic
from ldm.errors import UserError


class StatisticsMismatchError(UserError, ValueError):
    """Cached statistics that were computed by another extractor or from another image set."""


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
        with atomic.atomic_open(path, "wb") as file:  # a file object: np.savez would append .npz to a name
            np.savez(
                file,
                mu=self.mean.cpu().numpy(),
                sigma=self.covariance.cpu().numpy(),
                count=np.int64(self.count),
                extractor=np.str_(self.extractor),
                source=np.str_(source),
            )

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


RANGE_OVERSAMPLING = 10  # random directions beyond the rank bound (Halko et al. 2011 suggest 5-10)


def _low_rank_factor(matrix: Tensor, rank_bound: int) -> Tensor | None:
    """L (D, k) with L L^T = matrix for a symmetric PSD matrix of rank <= rank_bound < k, else None.

    The range is found from k = rank_bound + RANGE_OVERSAMPLING fixed random directions (Halko,
    Martinsson & Tropp 2011, "Finding Structure with Randomness", Alg. 4.1: exact when the rank is
    below k), then the k x k projection is factored: O(D^2 k) instead of O(D^3). Rounding-level
    eigenvalues are dropped. None when the range misses energy (a ``rank_bound`` that is wrong).
    """
    dim, k = matrix.shape[0], rank_bound + RANGE_OVERSAMPLING
    generator = torch.Generator(device=matrix.device).manual_seed(0)  # the same directions every call
    probe = torch.randn(dim, k, generator=generator, dtype=matrix.dtype, device=matrix.device)  # (D, k)
    basis, _ = torch.linalg.qr(matrix @ probe)  # (D, k), orthonormal columns spanning the range
    projected = basis.T @ matrix @ basis  # (k, k)
    eigenvalues, eigenvectors = torch.linalg.eigh((projected + projected.T) / 2)
    eps = torch.finfo(matrix.dtype).eps
    eigenvalues = torch.where(eigenvalues > eigenvalues.max() * k * eps, eigenvalues, 0)
    factor = (basis @ eigenvectors) * eigenvalues.sqrt()  # (D, k)
    # trace(C) - ||L||_F^2 = trace((I - P) C (I - P)) >= 0: the energy outside the basis
    if matrix.trace() - factor.square().sum() > 1e-9 * matrix.trace().abs():
        return None
    return factor


def _psd_factor(matrix: Tensor, rank_bound: int) -> Tensor:
    """A factor L with L L^T = matrix (symmetric PSD, rank <= ``rank_bound``): from its range when
    the rank bound is well below D (fewer samples than dimensions), else Cholesky when it succeeds
    (full rank), else the symmetric square root, rounding's tiny negative eigenvalues clamped to 0."""
    matrix = (matrix + matrix.T) / 2
    if rank_bound + RANGE_OVERSAMPLING < matrix.shape[0]:
        factor = _low_rank_factor(matrix, rank_bound)
        if factor is not None:
            return factor
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
    feature dimensions) stay exact, e.g. a set against itself gives 0 to ~1e-12. Their factors come
    from their range (``_low_rank_factor``), so a few images cost little even at D = 2048.
    """
    if a.dim != b.dim:
        raise ValueError(f"statistics of {a.dim}-d and {b.dim}-d features do not compare")
    if a.extractor and b.extractor and a.extractor != b.extractor:
        raise StatisticsMismatchError(f"statistics of different extractors: {a.extractor!r} and {b.extractor!r}")
    device = a.mean.device
    cov_a, cov_b = a.covariance, b.covariance.to(device)  # (D, D)
    # n samples give a covariance of rank <= n - 1
    trace_sqrt = torch.linalg.svdvals(_psd_factor(cov_a, a.count - 1).T @ _psd_factor(cov_b, b.count - 1)).sum()
    diff = a.mean - b.mean.to(device)  # (D,)
    return float(diff @ diff + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)
