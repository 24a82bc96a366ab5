"""Every config under configs/ composes, and every group option instantiates its objects."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from conftest import CONFIGS, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
GROUP_OPTIONS = [
    (group, p.stem)
    for group in ("schedule", "objective", "sampler", "optim", "logger", "data")
    for p in sorted((CONFIGS / group).glob("*.yaml"))
]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_config("train", [f"experiment={experiment}"])
    assert cfg.task._target_ and cfg.trainer.max_steps > 0


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    cfg = compose_config("train", [f"{group}={option}"])
    assert group in cfg


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIGS / "schedule").glob("*.yaml")))
def test_schedules_instantiate(option):
    cfg = compose_config("train", [f"schedule={option}"])
    schedule = instantiate(cfg.schedule)
    assert schedule.num_timesteps == 1000


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIGS / "objective").glob("*.yaml")))
def test_objectives_instantiate(option):
    cfg = compose_config("train", [f"objective={option}"])
    assert instantiate(cfg.objective).prediction_type == option


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIGS / "sampler").glob("*.yaml")))
def test_samplers_instantiate(option):
    cfg = compose_config("sample", [f"sampler={option}", "checkpoint=x.ckpt"])
    assert callable(instantiate(cfg.sampler))


def test_toy_model_instantiates_with_expected_shapes():
    import torch

    cfg = compose_config("train", ["model.autoencoder.path=null"])
    unet = instantiate(cfg.model.unet)
    autoencoder = instantiate(cfg.model.autoencoder)
    conditioner = instantiate(cfg.model.conditioner)
    assert autoencoder.downsampling_factor == 4 and conditioner.context_dim == cfg.model.unet.context_dim
    with torch.no_grad():
        z = autoencoder.encode_to_latent(torch.zeros(1, 3, 64, 64))
        out = unet(z, torch.tensor([10]), conditioner(["a red circle in the top left"]))
    assert z.shape == out.shape == (1, 4, 16, 16)


def test_every_config_file_is_documented():
    # each group option starts with a comment saying what it is (docs/configuration.md indexes them)
    for path in sorted(Path(CONFIGS).rglob("*.yaml")):
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{path.relative_to(CONFIGS)} has no leading comment"
