"""Our training checkpoints (Lightning ``.ckpt`` written by ``train.py``) as ``ModelBundle``s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm.checkpoints import load_training_checkpoint, submodule_state
from ldm.formats.bundle import ModelBundle

_NOT_KWARGS = ("_target_", "_partial_", "_convert_", "_recursive_")


def _kwargs(node: dict[str, Any]) -> dict[str, Any]:
    """Constructor kwargs of a Hydra node (``with_weights`` wrappers unwrapped)."""
    if node.get("_target_") == "ldm.checkpoints.with_weights":
        node = node["module"]
    return {k: v for k, v in node.items() if k not in _NOT_KWARGS}


def _rebuilt_frozen(checkpoint: dict[str, Any], name: str) -> dict[str, Any]:
    """A frozen part left out of the checkpoint, rebuilt from its config and checked by fingerprint."""
    from hydra.utils import instantiate

    from ldm.errors import UserError
    from ldm.training.latent_diffusion import fingerprint

    module = instantiate(checkpoint["ldm"]["config"]["model"][name])
    expected = checkpoint["ldm"].get("frozen_fingerprints", {}).get(name)
    if expected is not None and fingerprint(module) != expected:
        raise UserError(f"the configured {name} weights differ from those this checkpoint was trained with")
    return module.state_dict()


def bundle_from_training_checkpoint(path: str | Path, use_ema: bool = True) -> ModelBundle:
    """The model of a training checkpoint (EMA U-Net by default) with the configs it was built from."""
    checkpoint = load_training_checkpoint(path)
    config = checkpoint["ldm"]["config"]
    state = checkpoint["state_dict"]
    prefix = "ema.module." if use_ema and any(k.startswith("ema.module.") for k in state) else "unet."
    frozen = {}
    for name in ("autoencoder", "conditioner"):
        frozen[name] = submodule_state(state, f"{name}.") or _rebuilt_frozen(checkpoint, name)
    text_config = _kwargs(config["model"]["conditioner"])
    text_config.pop("pretrained", None)  # the weights travel in the bundle
    schedule_node = config["schedule"]
    kind = schedule_node["betas"]["_target_"].rsplit(".", 1)[1].removesuffix("_betas")
    return ModelBundle(
        unet_config=_kwargs(config["model"]["unet"]),
        vae_config=_kwargs(config["model"]["autoencoder"]),
        text_config=text_config,
        unet=submodule_state(state, prefix),
        vae=frozen["autoencoder"],
        text=submodule_state(frozen["conditioner"], "model."),
        family=config["model"].get("family", "custom"),
        prediction_type=config["objective"]["prediction_type"],
        image_size=int(config["task"]["image_size"]),
        schedule=dict(
            kind=kind,
            **{k: v for k, v in schedule_node["betas"].items() if k not in _NOT_KWARGS},
            zero_terminal_snr=bool(schedule_node.get("zero_terminal_snr", False)),
            snr_shift=float(schedule_node.get("snr_shift", 1.0)),
        ),
    )
