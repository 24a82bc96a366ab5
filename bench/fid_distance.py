"""FID's Fréchet distance at D = 2048: ours against pytorch-fid's, seconds and error against exact values.

    python bench/fid_distance.py [--counts 50 1000 3000] [--dim 2048] [--repeats 1] [--threads N]

Ours (ldm/evaluation/fid_statistics.py): torch, factors of each covariance (from its range when
there are fewer samples than dimensions, else Cholesky), Tr((C_a C_b)^1/2) as a nuclear norm.
pytorch-fid's ``calculate_frechet_distance``: scipy's ``sqrtm`` of C_a C_b. Both get the same
float64 statistics of n correlated Gaussian feature vectors (an Inception-like 2048-d spectrum):
"scaled" sets b = c a + s, whose FID is ||mu_a - mu_b||^2 + (1 - c)^2 Tr C_a at any rank;
"independent" sets (n <= D), whose exact FID is computed from the (n, n) matrix of centred
features X_a X_b^T (its singular values are those of L_a^T L_b for the factors L = X^T / sqrt(n-1)).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from ldm.evaluation.fid_statistics import FeatureStatistics, frechet_distance


def features(n: int, dim: int, seed: int) -> torch.Tensor:
    """(n, dim) float64 vectors with a decaying spectrum and an offset mean."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    scales = torch.logspace(0, -3, dim, dtype=torch.float64)  # (dim,) stds from 1 to 1e-3
    return (torch.randn(n, dim, generator=g, dtype=torch.float64) * scales) @ mixing * 0.1 + 0.3


def exact_from_features(x: torch.Tensor, y: torch.Tensor) -> float:
    xc, yc = (x - x.mean(0)) / (len(x) - 1) ** 0.5, (y - y.mean(0)) / (len(y) - 1) ** 0.5  # (n, D)
    mean_term = ((x.mean(0) - y.mean(0)) ** 2).sum()
    return float(mean_term + xc.square().sum() + yc.square().sum() - 2 * torch.linalg.svdvals(xc @ yc.T).sum())


def timed(fn, repeats: int) -> tuple[float, float]:
    """(value, median wall seconds) of ``repeats`` calls."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        seconds.append(time.perf_counter() - start)
    return value, sorted(seconds)[len(seconds) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[50, 1000, 3000], help="samples per set")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1, help="calls per measurement (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # scipy: sqrtm(disp=) deprecated, "matrix is singular"
    print(f"D = {args.dim}, float64, {args.threads} threads, median wall seconds of {args.repeats} call(s)")
    header = ("n", "set", "exact FID", "ours err", "p-fid err", "ours s", "p-fid s", "ratio")
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, (6, 12, 14, 10, 10, 8, 8, 6))))
    for n in args.counts:
        x = features(n, args.dim, seed=n)
        cases = {"scaled": 0.7 * x + torch.linspace(-0.01, 0.01, args.dim, dtype=torch.float64)}
        if n <= args.dim:
            cases["independent"] = features(n, args.dim, seed=n + 1)
        a = FeatureStatistics.from_features(x)
        for name, y in cases.items():
            b = FeatureStatistics.from_features(y)
            if name == "scaled":
                exact = float(((a.mean - b.mean) ** 2).sum() + 0.3**2 * a.covariance.trace())
            else:
                exact = exact_from_features(x, y)
            ours, ours_s = timed(lambda: frechet_distance(a, b), args.repeats)
            stats = [s.numpy() for s in (a.mean, a.covariance, b.mean, b.covariance)]
            theirs, theirs_s = timed(lambda: float(calculate_frechet_distance(*stats)), args.repeats)
            print(
                f"{n:>6} {name:>12} {exact:>14.8f} {ours - exact:>10.1e} {theirs - exact:>10.1e} "
                f"{ours_s:>8.2f} {theirs_s:>8.2f} {theirs_s / ours_s:>6.1f}"
            )


if __name__ == "__main__":
    main()
