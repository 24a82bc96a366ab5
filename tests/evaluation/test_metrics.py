"""The metrics CLI on small toy folders: every metric, the cache, the settings, one-line errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import pytorch_fid
import torch
from pytorch_fid_reference import PytorchFidRun
from torch import Tensor, nn

from ldm.checkpoints import save_safetensors
from ldm.data.toy import caption, render, sample_spec
from ldm.evaluation.fid_statistics import FeatureStatistics
from ldm.evaluation.metrics import evaluate, main

SETTINGS = {"sampler": "euler", "steps": 20, "guidance_scale": 3.0, "negative_prompt": "", "spacing": "trailing"}
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16, "layers": 1},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _toy_folder(folder: Path, n: int, seed: int, checkpoint: Path | None = None) -> None:
    """Real toy images and a metadata.jsonl as sample.py writes it."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        spec = sample_spec(rng)
        render(spec).save(folder / f"{i:05d}.png")
        row = {"file": f"{i:05d}.png", "prompt": caption(spec), "seed": i, **SETTINGS, "key": f"k{i}"}
        if checkpoint is not None:
            row.update(checkpoint=str(checkpoint), use_ema=True)
        rows.append(row)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random-weight stand-in for an open_clip model (config + weights)."""
    directory = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    (directory / "tiny_clip.json").write_text(json.dumps(TINY_CLIP))
    save_safetensors(open_clip.CLIP(**TINY_CLIP).state_dict(), directory / "tiny_clip.safetensors")
    return {"clip_config": directory / "tiny_clip.json", "clip": directory / "tiny_clip.safetensors"}


def test_cli_writes_the_configured_metrics(tmp_path: Path, weights: dict[str, Path]) -> None:
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not really a checkpoint" * 100)
    _toy_folder(tmp_path / "samples", 4, seed=0, checkpoint=checkpoint)
    out = tmp_path / "out" / "metrics.json"
    code = main(
        [
            str(tmp_path / "samples"),
            "--clip-model",
            str(weights["clip_config"]),
            "--clip-weights",
            str(weights["clip"]),
            "--toy",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
            "--batch-size",
            "3",
        ]
    )
    assert code == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == {
        "samples_dir",
        "num_images",
        "created",
        "checkpoint",
        "sampling",
        "varying_fields",
        "clip_score",
        "toy_accuracy",
    }
    assert metrics["num_images"] == 4
    assert metrics["sampling"] == SETTINGS and metrics["varying_fields"] == ["key"]
    identity = metrics["checkpoint"]
    assert identity["size"] == checkpoint.stat().st_size and identity["use_ema"] is True
    assert identity["sha256_first_64MiB"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert 0 <= metrics["clip_score"]["value"] <= 100 and metrics["clip_score"]["num_pairs"] == 4
    assert metrics["clip_score"]["model"].endswith("sha256:" + identity_of(weights["clip"]))
    assert metrics["toy_accuracy"]["all"] == 1.0 and metrics["toy_accuracy"]["num_images"] == 4


def identity_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()[: 64 * 2**20]).hexdigest()[:16]


@pytest.mark.slow
def test_cli_fid_equals_pytorch_fids_and_writes_and_checks_its_cache(
    tmp_path: Path, pytorch_fid_run: PytorchFidRun, pytorch_fid_value: float
) -> None:
    """The command's FID against pytorch-fid's on the same folders and (random) weights."""
    samples, reference = tmp_path / "samples", tmp_path / "reference"
    shutil.copytree(pytorch_fid_run.folders.samples, samples)
    shutil.copytree(pytorch_fid_run.folders.reference, reference)
    cache = tmp_path / "cache" / "ref.npz"
    weights = pytorch_fid_run.weights
    common = ["--fid-weights", str(weights), "--reference-stats", str(cache), "--device", "cpu", "--no-progress"]
    assert main([str(samples), "--reference", str(reference), *common]) == 0
    fid = json.loads((samples / "metrics.json").read_text())["fid"]  # the default output path
    assert pytorch_fid_value > 0.1  # large enough for the tolerance to mean something
    assert abs(fid["value"] - pytorch_fid_value) <= 1e-3
    assert (fid["num_generated"], fid["num_reference"]) == (4, 4)
    version = pytorch_fid.__version__
    assert fid["extractor"] == f"inception_v3-fid sha256:{identity_of(weights)} pytorch-fid-{version} pool3"
    cached = FeatureStatistics.load(cache, extractor=fid["extractor"], source=fid["reference"])
    theirs = pytorch_fid_run.features["reference"]  # (4, 2048)
    assert cached.count == 4
    np.testing.assert_allclose(cached.mean.numpy(), theirs.mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(cached.covariance.numpy(), np.cov(theirs, rowvar=False), rtol=0, atol=1e-6)
    # another reference with the same cache file is refused in one line
    with pytest.raises(SystemExit):
        main([str(samples), "--reference", str(samples), *common])


class ColourStats(nn.Module):
    feature_dim = 6
    description = "colour-stats-v1"

    def forward(self, images: Tensor) -> Tensor:
        x = images.float().flatten(2) / 255  # (B, 3, H*W)
        return torch.cat([x.mean(-1), x.std(-1)], dim=1)  # (B, 6)


def test_evaluate_a_folder_without_metadata(tmp_path: Path) -> None:
    _toy_folder(tmp_path / "samples", 5, seed=0)
    (tmp_path / "samples" / "metadata.jsonl").unlink()
    results = evaluate(
        tmp_path / "samples", fid_extractor=ColourStats(), reference=str(tmp_path / "samples"), progress=False
    )
    assert results["num_images"] == 5 and results["sampling"] == {} and results["checkpoint"] is None
    assert abs(results["fid"]["value"]) < 1e-6

    _toy_folder(tmp_path / "reference", 6, seed=1)
    cache = tmp_path / "ref.npz"
    first = evaluate(
        tmp_path / "samples",
        fid_extractor=ColourStats(),
        reference=str(tmp_path / "reference"),
        reference_stats=cache,
        progress=False,
    )["fid"]
    cached = evaluate(tmp_path / "samples", fid_extractor=ColourStats(), reference_stats=cache, progress=False)["fid"]
    assert first["value"] > 0 and cached["value"] == pytest.approx(first["value"], rel=1e-10)
    assert (cached["num_reference"], cached["reference"]) == (6, None)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/absent", "--toy"], "samples folder not found"),
        (["{tmp}/samples"], "nothing to compute"),
        (["{tmp}/samples", "--fid-weights", "{tmp}/none.pth", "--reference", "{tmp}/samples"], "FID weights not found"),
        (["{tmp}/samples", "--reference", "{tmp}/samples"], "FID needs --fid-weights"),
        (["{tmp}/samples", "--clip-weights", "{tmp}/absent.safetensors"], "CLIP weights not found"),
        (["{tmp}/samples", "--toy", "--reference-stats", "{tmp}/absent.npz"], "FID needs --fid-weights"),
        (["{tmp}/samples", "--fid-weights", "{tmp}/samples/00000.png"], "FID needs --reference"),
        (["{tmp}/bare", "--toy"], "no metadata.jsonl"),
        (["{tmp}/empty", "--toy"], "no images in"),
    ],
)
def test_cli_mistakes_are_one_line_errors(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    _toy_folder(tmp_path / "samples", 1, seed=0)
    (tmp_path / "bare").mkdir()
    (tmp_path / "samples" / "00000.png").rename(tmp_path / "bare" / "00000.png")
    (tmp_path / "samples" / "00000.png").write_bytes((tmp_path / "bare" / "00000.png").read_bytes())
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(tmp=tmp_path) for arg in args] + ["--no-progress", "--device", "cpu"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error
