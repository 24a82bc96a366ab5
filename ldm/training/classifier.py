"""Train a noise-aware classifier of noisy latents for classifier guidance (Dhariwal & Nichol 2021, Sec. 4).

Each step: z_0 = the frozen VAE's scaled latent of each image, t ~ U{0..T-1}, z_t = alpha_t z_0 +
sigma_t eps with the diffusion model's own schedule, and a cross-entropy per attribute head on the
labels read from the captions (the toy's "a {colour} {shape} in the {position}"). The classifier then
scores p(y | z_t) at every noise level a sampler visits.

Its checkpoint holds a typed spec (``CLASSIFIER_SPEC``): the classifier's constructor arguments, the
class names of every head, the schedule, the VAE's fingerprint and its latent scale. ``load_classifier`` builds a
``NoisyClassifier`` from it with weights_only loading; nothing stored is instantiated.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from ldm.checkpoints import fingerprint, load_training_checkpoint, submodule_state
from ldm.data.toy import COLOURS, POSITIONS, SHAPES
from ldm.data.transforms import to_model_range
from ldm.diffusion.parameterization import add_noise
from ldm.diffusion.schedules import NoiseSchedule
from ldm.errors import UserError
from ldm.formats.bundle import schedule_from_spec
from ldm.formats.spec import _plain, checked_schedule
from ldm.models.classifier import NoisyClassifier
from ldm.training.caches import PosteriorCache

CLASSIFIER_SPEC = "classifier_spec"  # the checkpoint's ldm entry that holds the spec
# the toy's attributes and their class names, in the order of ldm.data.toy
TOY_CLASSES: dict[str, list[str]] = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS)}
_TOY_CAPTION = re.compile(r"^a (?P<colour>\w+) (?P<shape>\w+) in the (?P<position>[\w ]+)$")


def caption_labels(captions: Iterable[str], classes: Mapping[str, list[str]] = TOY_CLASSES) -> dict[str, Tensor]:
    """Class indices per attribute, {attribute: (B,) long}, from toy captions "a {colour} {shape} in the {position}"."""
    rows = []
    for caption in captions:
        match = _TOY_CAPTION.match(caption.strip())
        if match is None or any(match[name] not in classes[name] for name in classes):
            raise UserError(f"classifier: {caption!r} is not a toy caption 'a <colour> <shape> in the <position>'")
        rows.append([classes[name].index(match[name]) for name in classes])
    table = torch.tensor(rows, dtype=torch.long).reshape(-1, len(classes))  # (B, attributes)
    return {name: table[:, i] for i, name in enumerate(classes)}


class NoisyClassifierTraining(pl.LightningModule):
    """Trains a ``NoisyClassifier`` on noisy latents of a frozen VAE, one cross-entropy per head.

    Batches are {"image": (B, 3, H, W), "caption": list[str]}. Logs ``train/loss`` (summed over heads)
    and ``train/acc_<head>``; in validation ``val/loss``, ``val/acc_<head>`` over all t and
    ``val/acc_<head>_low_noise`` over t < T/2 (the high-noise half is near chance by design: z_t holds
    little of the image there).
    """

    def __init__(
        self,
        classifier: NoisyClassifier,
        autoencoder: nn.Module,
        schedule: NoiseSchedule,
        optimizer: Callable[[Iterable[Tensor]], Optimizer],
        lr_scheduler: Callable[[Optimizer], Any] | None = None,
        image_size: int = 64,
        posterior_cache_size: int = 0,  # > 0: keep the VAE posteriors of this many recent images (exact, for CPUs)
        run_config: dict | None = None,
    ):
        super().__init__()
        expected = {name: len(names) for name, names in TOY_CLASSES.items()}
        if classifier.heads_classes != expected:
            raise ValueError(f"the classifier's heads {classifier.heads_classes} must be the toy's {expected}")
        self.classifier = classifier
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.schedule = schedule
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.image_size = image_size
        self.posterior_cache = PosteriorCache(posterior_cache_size)
        self.run_config = run_config or {}
        self.flops_per_batch: float | None = None  # read by Lightning's ThroughputMonitor

    def train(self, mode: bool = True) -> NoisyClassifierTraining:
        super().train(mode)
        self.autoencoder.eval()  # Lightning's model.train() must not wake the frozen VAE
        return self

    @torch.no_grad()
    def noisy_latents(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(z_t (B, C, h, w), t (B,)) with t ~ U{0..T-1} and the schedule's forward process."""
        with torch.autocast(self.device.type, enabled=False):
            moments = self.posterior_cache(self.autoencoder.encode_moments, to_model_range(images).float())
            latents = self.autoencoder.latent_from_moments(moments)  # (B, C, h, w), a fresh z ~ q(z | x)
        t = torch.randint(0, self.schedule.num_timesteps, (latents.shape[0],), device=latents.device)
        alpha = self.schedule.alpha(t, latents.ndim, like=latents)
        sigma = self.schedule.sigma(t, latents.ndim, like=latents)
        return add_noise(latents, torch.randn_like(latents), alpha, sigma), t

    def losses(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """(loss summed over heads, {head: per-image correctness (B,)}, t (B,))."""
        labels = caption_labels(batch["caption"])
        z_t, t = self.noisy_latents(batch["image"])
        logits = self.classifier(z_t, t)
        loss = z_t.new_zeros(())
        correct = {}
        for name, label in labels.items():
            label = label.to(z_t.device)
            loss = loss + F.cross_entropy(logits[name].float(), label)
            correct[name] = (logits[name].argmax(dim=-1) == label).float()
        return loss, correct, t

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss, correct, _ = self.losses(batch)
        batch_size = len(batch["caption"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/acc_{name}": c.mean() for name, c in correct.items()}, batch_size=batch_size)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        loss, correct, t = self.losses(batch)
        low = (t < self.schedule.num_timesteps // 2).float()
        metrics = {"val/loss": loss}
        for name, c in correct.items():
            metrics[f"val/acc_{name}"] = c.mean()
            metrics[f"val/acc_{name}_low_noise"] = (c * low).sum() / low.sum().clamp(min=1)
        self.log_dict(metrics, sync_dist=True, prog_bar=False, batch_size=len(batch["caption"]))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.classifier.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def classifier_spec(self) -> dict[str, Any]:
        """The plain-data spec a checkpoint stores: constructor arguments, class names, schedule, VAE."""
        schedule = self.schedule.spec.to_dict() if self.schedule.spec is not None else None
        return {
            "config": _plain(self.classifier.config, "classifier"),
            "classes": TOY_CLASSES,
            "schedule": schedule,
            "autoencoder_fingerprint": fingerprint(self.autoencoder),
            "latent_scale": float(getattr(self.autoencoder, "scaling_factor", 1.0)),  # z_0 = scale * E(x)
            "image_size": self.image_size,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ldm"] = {CLASSIFIER_SPEC: self.classifier_spec(), "config": self.run_config}


def _checked_spec(spec: Any, path: str | Path) -> dict[str, Any]:
    if not (isinstance(spec, dict) and isinstance(spec.get("config"), dict) and isinstance(spec.get("classes"), dict)):
        raise UserError(f"{path}: not a classifier checkpoint (no classifier spec; see experiment=toy_classifier)")
    classes = {}
    for name, names in spec["classes"].items():
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
            raise UserError(f"{path}: classifier spec: the classes of {name!r} are not a list of names")
        classes[str(name)] = names
    config = _plain(spec["config"], "classifier")
    accepted = set(inspect.signature(NoisyClassifier.__init__).parameters) - {"self", "heads"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise UserError(f"{path}: classifier spec: NoisyClassifier takes no argument(s) {', '.join(unknown[:5])}")
    schedule = checked_schedule(spec["schedule"]) if spec.get("schedule") is not None else None
    return {**spec, "config": config, "classes": classes, "schedule": schedule}


def load_classifier(path: str | Path) -> tuple[NoisyClassifier, dict[str, Any]]:
    """The classifier of a ``experiment=toy_classifier`` checkpoint, in eval mode, and its checked spec
    (``classes``: the class names per head, ``schedule``, ``autoencoder_fingerprint``, ``latent_scale``,
    ``image_size``)."""
    checkpoint = load_training_checkpoint(path)
    record = checkpoint.get("ldm")
    spec = _checked_spec(record.get(CLASSIFIER_SPEC) if isinstance(record, dict) else None, path)
    heads = {name: len(names) for name, names in spec["classes"].items()}
    try:
        classifier = NoisyClassifier(heads, **spec["config"])
        classifier.load_state_dict(submodule_state(checkpoint["state_dict"], "classifier."))
    except (TypeError, ValueError, RuntimeError) as error:
        raise UserError(
            f"{path}: the classifier's weights do not fit its spec ({str(error).splitlines()[0]})"
        ) from None
    return classifier.requires_grad_(False).eval(), spec


def check_classifier_fits(
    spec: Mapping[str, Any], path: str | Path, autoencoder: nn.Module, schedule: NoiseSchedule
) -> None:
    """Refuse, in one line, a classifier trained on other latents than the model samples: another VAE
    (weights fingerprint, latent scale) or another noise schedule (its abar_t at every step)."""

    if spec.get("autoencoder_fingerprint") != fingerprint(autoencoder):
        raise UserError(
            f"classifier={path} was trained on another VAE's latents than the model's (VAE fingerprint "
            f"{spec.get('autoencoder_fingerprint')} vs {fingerprint(autoencoder)}): train it with the model's VAE"
        )
    scale = float(getattr(autoencoder, "scaling_factor", 1.0))
    if spec.get("latent_scale") is not None and abs(float(spec["latent_scale"]) - scale) > 1e-6 * scale:
        raise UserError(
            f"classifier={path} was trained on latents scaled by {spec['latent_scale']}, the model's are "
            f"scaled by {scale}"
        )
    if spec.get("schedule") is None:
        raise UserError(
            f"classifier={path}: its checkpoint names no noise schedule, so it cannot be checked against the model's"
        )
    theirs = schedule_from_spec(spec["schedule"]).alphas_cumprod
    ours = schedule.alphas_cumprod
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-6, atol=1e-9):
        raise UserError(
            f"classifier={path} was trained with another noise schedule than the model's ({spec['schedule']}): "
            "its noisy latents are not the model's"
        )
