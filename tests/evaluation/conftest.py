"""Fixtures of the FID tests: two small image folders and pytorch-fid's own numbers on them."""

from __future__ import annotations

import pytest
from pytorch_fid_reference import (
    ImageFolders,
    PytorchFidRun,
    pytorch_fid_distance,
    run_pytorch_fid,
    write_image_folders,
)


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory: pytest.TempPathFactory) -> ImageFolders:
    return write_image_folders(tmp_path_factory.mktemp("folders"))


@pytest.fixture(scope="session")
def pytorch_fid_run(tmp_path_factory: pytest.TempPathFactory, image_folders: ImageFolders) -> PytorchFidRun:
    return run_pytorch_fid(tmp_path_factory.mktemp("pytorch_fid") / "pt_inception-random.pth", image_folders)


@pytest.fixture(scope="session")
def pytorch_fid_value(pytorch_fid_run: PytorchFidRun) -> float:
    return pytorch_fid_distance(pytorch_fid_run)
