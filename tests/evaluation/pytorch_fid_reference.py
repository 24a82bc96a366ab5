"""pytorch-fid's own numbers on two small image folders: the reference our FID is held to.

``tests/evaluation/conftest.py`` makes them once per session: pytorch-fid's features for the feature
test (test_fid_inception.py), and its FID, whose 2048-d ``sqrtm`` is the slow part, for the
end-to-end FID test (test_metrics.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytorch_fid.inception as pytorch_fid_inception
import torch
from PIL import Image
from pytorch_fid import fid_score

from ldm.data.toy import caption, render, sample_spec
from ldm.evaluation.fid_inception import random_inception_weights

FOLDER_SIZE = 4  # images per folder: each costs an Inception pass (~1 s on a shared CPU) per path


@dataclass(frozen=True)
class ImageFolders:
    samples: Path  # 64x64 toy images and a metadata.jsonl (upsampled to 299 inside the network)
    reference: Path  # 400x320 toy images, no metadata (downsampled)


def write_image_folders(root: Path) -> ImageFolders:
    """FOLDER_SIZE toy images in each of two folders of different image sizes."""
    rng = np.random.default_rng(0)
    samples, reference = root / "samples", root / "reference"
    samples.mkdir()
    reference.mkdir()
    rows = []
    for i in range(FOLDER_SIZE):
        spec = sample_spec(rng)
        render(spec).save(samples / f"{i:05d}.png")
        rows.append({"file": f"{i:05d}.png", "prompt": caption(spec), "seed": i})
        render(sample_spec(rng)).resize((400, 320), Image.Resampling.BICUBIC).save(reference / f"{i:05d}.png")
    (samples / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return ImageFolders(samples, reference)


@dataclass(frozen=True)
class PytorchFidRun:
    weights: Path  # random FID-graph weights, a torch file like pt_inception-2015-12-05-6726825d.pth
    folders: ImageFolders
    features: dict[str, np.ndarray]  # folder name -> (N, 2048) from pytorch-fid's get_activations


def run_pytorch_fid(weights: Path, folders: ImageFolders) -> PytorchFidRun:
    """pytorch-fid's features (its PIL loading, ToTensor, DataLoader and InceptionV3 in
    ``get_activations``) with random weights written to ``weights``, with which its download call is
    answered."""
    torch.save(random_inception_weights("fid", seed=1), weights)

    def load_state_dict_from_url(url: str, *args, **kwargs) -> dict:
        assert url == pytorch_fid_inception.FID_WEIGHTS_URL
        return torch.load(weights, weights_only=True)

    with mock.patch.object(pytorch_fid_inception, "load_state_dict_from_url", load_state_dict_from_url):
        model = pytorch_fid_inception.InceptionV3([pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    features = {
        folder.name: fid_score.get_activations(sorted(folder.glob("*.png")), model, num_workers=0)  # (N, 2048)
        for folder in (folders.samples, folders.reference)
    }
    return PytorchFidRun(weights, folders, features)


def pytorch_fid_distance(run: PytorchFidRun) -> float:
    """pytorch-fid's FID of the samples against the reference: the numpy statistics of its
    ``calculate_activation_statistics`` (on the features above: one Inception pass per image, not
    two) and scipy's ``sqrtm`` in its ``calculate_frechet_distance`` (20-60 s at 2048-d on a shared CPU)."""
    samples, reference = (run.features[folder.name] for folder in (run.folders.samples, run.folders.reference))
    (mu_a, sigma_a), (mu_b, sigma_b) = ((np.mean(f, axis=0), np.cov(f, rowvar=False)) for f in (samples, reference))
    return float(fid_score.calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b))
