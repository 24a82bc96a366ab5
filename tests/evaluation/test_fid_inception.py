"""The FID Inception-v3: pytorch-fid's network on local weights, features equal to pytorch-fid's own
pipeline on the same images, weights files of both variants, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_fid
import pytorch_fid.inception as pytorch_fid_inception
import torch
import torch.nn.functional as F
from pytorch_fid_reference import PytorchFidRun
from torchvision.models import inception_v3
from torchvision.models.inception import InceptionE

from ldm.checkpoints import save_safetensors
from ldm.errors import UserError
from ldm.evaluation.fid_inception import InceptionV3Features, random_inception_weights
from ldm.evaluation.image_sets import ImageSet, rebatch


def _features(extractor: InceptionV3Features, folder: Path) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([extractor(images) for images in rebatch(ImageSet(str(folder)), 50)]).double().numpy()


def test_features_equal_pytorch_fids_on_the_same_images_and_weights(pytorch_fid_run: PytorchFidRun) -> None:
    """PNG -> uint8 -> our extractor against pytorch-fid's get_activations (PIL, ToTensor, its
    InceptionV3 with the bilinear resize to 299 inside): up- and downsampled images."""
    extractor = InceptionV3Features(pytorch_fid_run.weights)
    for folder in (pytorch_fid_run.folders.samples, pytorch_fid_run.folders.reference):
        ours, theirs = _features(extractor, folder), pytorch_fid_run.features[folder.name]
        assert ours.shape == theirs.shape == (4, 2048)
        assert np.abs(ours - theirs).max() <= 1e-5
        assert theirs.std(axis=0).mean() > 1e-2  # features that differ between images: 1e-5 means something
    # the check sees a change of resize: clean-fid's antialiased bicubic moves features 100x more
    images = next(iter(rebatch(ImageSet(str(pytorch_fid_run.folders.reference)), 1)))
    bicubic = F.interpolate(images.float() / 255, size=(299, 299), mode="bicubic", antialias=True)
    with torch.no_grad():
        moved = extractor.net(bicubic)[0].flatten(1).double().numpy()
    assert np.abs(moved - pytorch_fid_run.features["reference"][:1]).max() > 1e-3


@pytest.fixture(scope="module")
def inception() -> InceptionV3Features:
    return InceptionV3Features(weights=None)


def test_random_inception_features_of_odd_sized_uint8_images(inception: InceptionV3Features) -> None:
    images = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8)
    with torch.inference_mode():
        features = inception(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and not torch.equal(features[0], features[1])
    assert 1e-2 < features.abs().mean() < 10  # He-normal init: features of a useful scale
    assert "random-init-seed0" in inception.description and inception.feature_dim == 2048


def test_the_network_is_pytorch_fids_in_both_variants(tmp_path: Path) -> None:
    net = InceptionV3Features(None).net
    assert isinstance(net, pytorch_fid_inception.InceptionV3) and not net.training
    assert net.resize_input and net.normalize_input  # resize to 299 and [0, 1] -> [-1, 1] inside
    mixed_7c = net.blocks[3][2]
    assert type(mixed_7c) is pytorch_fid_inception.FIDInceptionE_2  # TensorFlow's max pool in the last block
    assert all(not p.requires_grad for p in net.parameters())

    torch.manual_seed(0)
    torchvision_state = inception_v3(weights=None, init_weights=False).state_dict()  # with its aux head
    save_safetensors(torchvision_state, tmp_path / "inception_v3_google.safetensors")
    tv = InceptionV3Features(tmp_path / "inception_v3_google.safetensors", variant="torchvision")
    assert type(tv.net.blocks[3][2]) is InceptionE and "inception_v3-torchvision" in tv.description
    pool_conv = torchvision_state["Mixed_7c.branch_pool.conv.weight"]
    assert torch.equal(tv.net.blocks[3][2].branch_pool.conv.weight, pool_conv)


def test_inception_weights_load_from_a_file_and_the_wrong_variant_is_refused(tmp_path: Path) -> None:
    state = random_inception_weights("fid", seed=3)
    save_safetensors(state, tmp_path / "pt_inception.safetensors")
    torch.save(state, tmp_path / "pt_inception.pth")  # the format of the published file
    for name in ("pt_inception.safetensors", "pt_inception.pth"):
        loaded = InceptionV3Features(tmp_path / name)
        assert torch.equal(loaded.net.blocks[3][2].branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
        assert "sha256:" in loaded.description and "inception_v3-fid" in loaded.description
        assert f"pytorch-fid-{pytorch_fid.__version__}" in loaded.description
    with pytest.raises(UserError, match="--fid-variant fid"):
        InceptionV3Features(tmp_path / "pt_inception.safetensors", variant="torchvision")
    with pytest.raises(FileNotFoundError):
        InceptionV3Features(tmp_path / "missing.pth")
    save_safetensors({"conv.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="does not hold Inception-v3 weights"):
        InceptionV3Features(tmp_path / "other.safetensors")


def test_building_downloads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(url: str, *args, **kwargs) -> None:
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    save_safetensors(random_inception_weights("torchvision"), tmp_path / "tv.safetensors")
    InceptionV3Features(None)
    InceptionV3Features(tmp_path / "tv.safetensors", variant="torchvision")
    with pytest.raises(AssertionError, match="tried to download"):  # what pytorch-fid does on its own
        pytorch_fid_inception.InceptionV3([3])
