import pytest
from hydra.utils import instantiate

from ldm.training.latent_diffusion import LatentDiffusion
from train import resolved_config


@pytest.fixture
def task(train_config) -> LatentDiffusion:
    """The tiny test config's LatentDiffusion task, built as train.py builds it."""
    cfg = train_config()
    return instantiate(cfg.task, _partial_=True, _convert_="all")(run_config=resolved_config(cfg))
