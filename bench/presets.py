"""The published SD sizes, read from the training presets (configs/model/*.yaml: the one place they are
written down), for benchmarks and tests that build SD-size networks without a file.

    from bench.presets import network_configs
    network_configs("sd15")["unet"]  # UNetModel keyword arguments
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NOT_ARGUMENTS = ("_target_", "gradient_checkpointing", "pretrained")


def network_configs(model: str) -> dict[str, dict[str, Any]]:
    """{"unet", "vae", "text"}: constructor keyword arguments of ``model=MODEL``'s three networks."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}"])
    GlobalHydra.instance().clear()
    nodes = OmegaConf.to_container(cfg.model, resolve=True)
    vae = nodes["autoencoder"]
    vae = vae.get("module", vae)  # the with_weights wrapper
    return {
        name: {k: v for k, v in node.items() if k not in NOT_ARGUMENTS}
        for name, node in (("unet", nodes["unet"]), ("vae", vae), ("text", nodes["conditioner"]))
    }
