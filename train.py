"""Train a latent diffusion model: `python train.py [experiment=NAME] [key=value ...]`.

With no arguments it trains the toy text-to-image model. `train(cfg)` is importable for tests.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import DeviceStatsMonitor, ProgressBar

from ldm.cli import one_line_errors
from ldm.formats import detect_format, load_weights_into
from ldm.training.resume import prepare_run_directory, say


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from, decided before anything is built (``ldm.training.resume``):
    ``resume=PATH`` checked to load, ``resume=auto`` the newest readable one of this run (or None,
    said), ``resume=null`` None, refusing a run directory that holds checkpoints unless ``overwrite``."""
    checkpoint_dir = Path(cfg.paths.output_dir) / "checkpoints"
    found = prepare_run_directory(checkpoint_dir, cfg.resume, bool(cfg.get("overwrite", False)))
    return str(found.path) if found else None


def warn_if_objective_differs(pretrained: str, stated: str, trained: str) -> None:
    """One line when a model file that states its prediction type (a diffusers folder's scheduler, a
    training checkpoint) is fine-tuned with another: deliberate (SD 2.x 768-v began as an eps model),
    or a wrong model preset (``model=sd21_768`` is the v one), which would train without an error."""
    if stated != trained and detect_format(pretrained) in ("diffusers", "training"):
        say(
            f"{pretrained} predicts {stated}, and this run trains it to predict {trained} "
            f"(objective.prediction_type): pick the model preset of the file if that is not meant",
            warning=True,
        )


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions (no effect without an Ampere+ GPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as plain data with every interpolation resolved (Hydra's own node dropped)."""
    return {
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items_ex(resolve=True)
        if key != "hydra"
    }


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg``, fit, and return the run directory and final metrics."""
    ckpt_path = resume_path(cfg)  # first: a refused run directory or a bad resume= costs no model build
    pl.seed_everything(cfg.seed, workers=True)
    set_tf32(cfg.get("tf32", True))
    run_config = resolved_config(cfg)
    datamodule = instantiate(cfg.data, _convert_="all")
    # _convert_="all": objects receive plain lists and dicts, never OmegaConf containers, so
    # nothing from OmegaConf ends up pickled in checkpoints (they load with weights_only=True)
    # (run_config is passed after instantiation: Hydra would build the _target_s inside it)
    task = instantiate(cfg.task, _partial_=True, _convert_="all")(run_config=run_config)
    if cfg.model.get("pretrained"):
        # fine-tuning: start from a model file; the EMA copy starts from it at the first update.
        # Also when resuming (resume=auto relaunches the same command): the checkpoint then replaces
        # the U-Net and EMA, and the frozen parts too big to store in it must come from this file
        bundle = load_weights_into(task.unet, task.autoencoder, task.conditioner, cfg.model.pretrained)
        warn_if_objective_differs(cfg.model.pretrained, bundle.prediction_type, task.objective.prediction_type)
    callbacks = [instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]  # Lightning refuses both
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if not logger:  # it only reports to a logger, and Lightning refuses it without one (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, DeviceStatsMonitor)]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    output_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(run_config, output_dir / "config.yaml")  # the resolved config of this run
    if logger:
        trainer.logger.log_hyperparams(run_config)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    _finish_wandb(logger)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        print(f"run directory: {output_dir.resolve()}")
    return {"output_dir": output_dir, "metrics": metrics, "trainer": trainer, "task": task}


def _finish_wandb(logger: Any) -> None:
    # an offline wandb run left open ends with a HandleAbandonedError in its debug log
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # expected and harmless here: the frozen VAE and text encoder stay in eval mode by design;
    # the second is torch 2.14's deprecation notice inside Lightning
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    with one_line_errors():
        train(cfg)


if __name__ == "__main__":
    main()
