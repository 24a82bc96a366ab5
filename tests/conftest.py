"""Shared fixtures: the real Hydra configs, shrunk to tiny sizes, and a small toy dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

from ldm_testing import TINY_MODEL, TINY_TRAINING, compose_config, train_tiny_checkpoint


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> Path:
    """A small toy dataset (256 train / 32 val samples), generated once per session."""
    from ldm.data.toy import write_toy_shards

    directory = tmp_path_factory.mktemp("data")
    write_toy_shards(directory / "toy", num_train=256, num_val=32, seed=0, samples_per_shard=128, progress=False)
    return directory


@pytest.fixture
def train_config(tmp_path, toy_data_dir):
    """``train.yaml`` shrunk to a tiny model and a few steps, writing into ``tmp_path``."""

    def make(*overrides: str) -> DictConfig:
        cfg = compose_config("train", [*TINY_MODEL, *TINY_TRAINING, *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.data_dir = str(toy_data_dir)
            if cfg.data.get("prepare") is not None:
                cfg.data.prepare.num_train = 256
                cfg.data.prepare.num_val = 32
        return cfg

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, toy_data_dir):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("run"), toy_data_dir, steps=2)
