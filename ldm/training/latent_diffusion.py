"""The latent diffusion training task: frozen VAE and text encoder around a trained U-Net."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ldm.checkpoints import fingerprint
from ldm.data.transforms import to_model_range
from ldm.diffusion.denoiser import implied_x0
from ldm.diffusion.losses import DiffusionObjective, sample_noise
from ldm.diffusion.schedules import NoiseSchedule
from ldm.errors import UserError
from ldm.formats.lora import lora_spec
from ldm.formats.training import frozen_source_paths, model_spec
from ldm.models.lora import AdaptedTextEncoder, AdaptedUNet, LoRANetwork, LoRASpec
from ldm.pipeline import TextToImage
from ldm.training.caches import ContextCache, PosteriorCache
from ldm.training.ema import build_ema
from ldm.training.flops import unet_training_flops
from ldm.training.optimizers import MuonAdamW
from ldm.training.rng import rng_state, set_rng_state
from ldm.training.sharding import is_sharded, shard_blocks
from ldm.training.strategies import fsdp_block_classes

FROZEN = ("autoencoder", "conditioner")


def freeze(module: nn.Module) -> nn.Module:
    """The one place frozen parts are frozen: eval mode, no gradients (and so no optimiser state)."""
    return module.requires_grad_(False).eval()


class LatentDiffusion(pl.LightningModule):
    """Train a U-Net to denoise VAE latents conditioned on text (Rombach et al. 2022).

    Each step: z0 = scale * VAE.encode(image); captions -> "" with probability ``caption_dropout``
    (so the same network learns the unconditional model for classifier-free guidance); context =
    text encoder(captions); t, eps ~ U{0..T-1}, N(0, I); loss = objective(U-Net(z_t, t, context)).
    Batches are {"image": (B,3,H,W) in [-1,1], "caption": list[str]} or, from precomputed shards,
    {"latent": (B,C,h,w) already scaled, "context": (B,L,D)}. Where images and captions repeat (the
    toy), ``posterior_cache_size`` and ``context_cache_size`` keep the frozen encoders' outputs of
    recent ones (``ldm/training/caches.py``): the same numbers, less time.

    Checkpoints keep the U-Net, its EMA copy, optimiser and schedule state. A frozen part is kept
    too when it is small (<= ``frozen_in_checkpoint_mb``, like the toy's), so the checkpoint stands
    alone; a large one (SD's VAE, CLIP) is left out, rebuilt from the stored config on load and
    checked against a fingerprint recorded at save time.

    ``lora`` (``task.lora``, a ``LoRASpec`` mapping; rank 0 = off) trains low-rank adapters instead
    (``ldm/models/lora.py``): the U-Net is frozen like the VAE (and stored the same way, by reference
    to ``model.pretrained`` when large), and only the adapters are in the optimiser, the EMA copy
    and the checkpoint's trained weights. Batches with a ``prior`` mask (DreamBooth) weigh their
    class-image samples by ``prior_loss_weight`` (Ruiz et al. 2023, Eq. 2).
    """

    def __init__(
        self,
        unet: nn.Module,
        autoencoder: nn.Module,
        conditioner: nn.Module,
        schedule: NoiseSchedule,
        objective: DiffusionObjective,
        optimizer: Callable[[Iterable[Tensor]], Optimizer],
        lr_scheduler: Callable[[Optimizer], Any] | None = None,
        caption_dropout: float = 0.1,
        ema_decay: float | None = 0.9999,
        ema_warmup: bool = True,
        ema_every_n_steps: int = 1,
        image_size: int = 64,
        frozen_in_checkpoint_mb: float = 64.0,
        channels_last: bool = False,
        context_cache_size: int = 0,
        posterior_cache_size: int = 0,
        compile_unet: bool | dict = False,
        self_conditioning_rate: float = 0.5,
        lora: LoRASpec | dict | None = None,
        prior_loss_weight: float = 1.0,
        run_config: dict | None = None,
    ):
        super().__init__()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        if not 0.0 <= self_conditioning_rate <= 1.0:
            raise ValueError(f"self_conditioning_rate must be in [0, 1], got {self_conditioning_rate}")
        if not 0.0 <= prior_loss_weight < float("inf"):
            raise UserError(f"task.prior_loss_weight must be a non-negative number, got {prior_loss_weight}")
        self.lora_spec = lora_spec(lora)
        self.unet = unet
        self.autoencoder = freeze(autoencoder)
        self.conditioner = freeze(conditioner)
        self.frozen_names = FROZEN
        self.lora: LoRANetwork | None = None
        if self.lora_spec.enabled:
            # the U-Net is frozen like the VAE; the adapters' hooks add their updates to its layers'
            # outputs, so its names, weights and fingerprint stay those of the base model
            self.unet = freeze(unet)
            self.frozen_names = ("unet", *FROZEN)
            self.lora = LoRANetwork.for_training(self.lora_spec, unet, conditioner)
            self._lora_hooks = self.lora.attach(unet)
        self.prior_loss_weight = float(prior_loss_weight)
        self.schedule = schedule
        self.objective = objective
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.caption_dropout = caption_dropout
        trained = self.lora if self.lora is not None else unet
        self.ema = build_ema(trained, ema_decay, ema_warmup) if ema_decay is not None else None
        self.ema_every_n_steps = ema_every_n_steps
        self.image_size = image_size
        self.frozen_in_checkpoint_mb = frozen_in_checkpoint_mb
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:  # NHWC convolutions: faster with cuDNN on tensor cores and oneDNN on CPUs
            for module in (self.unet, self.autoencoder, self.lora, self.ema):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        self.context_cache = ContextCache(context_cache_size)
        self.posterior_cache = PosteriorCache(posterior_cache_size)
        self.self_conditioning_rate = self_conditioning_rate
        if compile_unet:
            # in place (state-dict keys unchanged), after the EMA deep copy, which stays eager
            self.unet.compile(**(compile_unet if isinstance(compile_unet, dict) else {}))
        self.run_config = run_config or {}
        check_image_size(image_size, autoencoder, unet)
        check_prediction_at_zero_snr(schedule, objective.prediction_type)
        # the typed model spec and where the frozen parts come from, decided now from the user's own
        # config: a checkpoint stores these plain values, never a config to instantiate
        self.model_spec = model_spec(self.run_config) if "model" in self.run_config else None
        self.frozen_sources = frozen_source_paths(self.run_config) if "model" in self.run_config else {}
        self._frozen_fingerprints: dict[str, str] = {}  # computed once: frozen parts never change in a run
        self.flops_per_batch: float | None = None  # set by a FLOP count for MFU (ThroughputMonitor)
        self._rng_to_restore: dict[str, Any] | None = None

    # ---------------------------------------------------------------- training
    def configure_model(self) -> None:
        """Under a strategy that shards parameters (``strategy=fsdp2``): the U-Net and its EMA copy
        sharded block by block over the data-parallel ranks, the frozen parts left whole
        (``ldm.training.sharding``). Lightning calls it before the optimiser is built; a no-op otherwise."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not getattr(strategy, "shards_parameters", False) or is_sharded(self.unet):
            return

        mesh = self.device_mesh["data_parallel"]
        for network in (self.unet,) + ((self.ema.module,) if self.ema is not None else ()):
            # FSDP2 shards parameters along their first dimension and wants them contiguous:
            # with channels_last, the activations stay NHWC (``memory_format``), the weights NCHW
            network.to(memory_format=torch.contiguous_format)
            shard_blocks(network, mesh, fsdp_block_classes(), strategy.reshard_after_forward)
        # the strategy loads checkpoints before on_load_checkpoint, which restores the frozen parts a
        # checkpoint leaves out and checks that nothing else is missing
        self.strict_loading = False

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        for name in self.frozen_names:
            getattr(self, name).eval()  # Lightning's model.train() must not wake the frozen parts
        if self.ema is not None:
            self.ema.eval()
        return self

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.image_size // self.autoencoder.downsampling_factor
        return (self.unet.in_channels, size, size)

    def drop_captions(self, captions: list[str]) -> list[str]:
        """Replace each caption by "" with probability ``caption_dropout`` (Ho & Salimans 2022)."""
        if self.caption_dropout == 0:
            return list(captions)
        keep = torch.rand(len(captions)) >= self.caption_dropout
        return [c if k else "" for c, k in zip(captions, keep.tolist())]

    @torch.no_grad()
    def encode_batch(self, batch: dict[str, Any], drop_captions: bool, use_ema: bool = False) -> tuple[Tensor, Tensor]:
        """(scaled latents z0 (B,C,h,w), text context (B,L,D)) from images or precomputed latents.

        With text-encoder adapters the context is computed by the adapted encoder (``use_ema``: its
        EMA adapters), with gradients when training, and never cached."""
        adapted_text = self.lora is not None and bool(self.lora.text_names)
        if "latent" in batch:
            if adapted_text:
                raise UserError(
                    "task.lora.text_encoder=true trains the text encoder, which needs captions: "
                    "precomputed contexts (data=latents) cannot be used"
                )
            return batch["latent"], batch["context"]
        with torch.autocast(self.device.type, enabled=False):
            # the VAE stays in float32: half-precision VAEs overflow into NaNs and black images
            images = to_model_range(batch["image"]).float()
            moments = self.posterior_cache(self._encode_moments, images)
            latents = self.autoencoder.latent_from_moments(moments)
        captions = self.drop_captions(batch["caption"]) if drop_captions else list(batch["caption"])
        if adapted_text:
            with torch.set_grad_enabled(self.training):  # the adapters learn through the context
                return latents, self.text_encoder(use_ema)(captions)
        return latents, self.context_cache(self.conditioner, captions)

    def denoising_network(self, use_ema: bool = True) -> nn.Module:
        """The U-Net that validation and sampling run: the EMA copy (or, for a LoRA run, the U-Net
        with its EMA adapters) when ``use_ema`` and there is one, else the trained weights."""
        ema = use_ema and self.ema is not None
        if self.lora is None:
            return self.ema.module if ema else self.unet
        return AdaptedUNet(self.unet, self.lora, self.ema.module) if ema else self.unet

    def text_encoder(self, use_ema: bool = True) -> nn.Module:
        """The text encoder, adapted by the (EMA) text adapters of a LoRA run that trains them."""
        if self.lora is None or not self.lora.text_names:
            return self.conditioner
        return AdaptedTextEncoder(self.conditioner, self.ema.module if use_ema and self.ema is not None else self.lora)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the U-Net, or a LoRA run's adapters alone."""
        return list((self.lora if self.lora is not None else self.unet).parameters())

    def _encode_moments(self, images: Tensor) -> Tensor:
        return self.autoencoder.encode_moments(images.contiguous(memory_format=self.memory_format))

    def diffusion_loss(self, latents: Tensor, context: Tensor, sample_weights: Tensor | None = None) -> Tensor:
        """The objective's loss on one batch; ``sample_weights`` (B,) multiply each sample's term."""
        t = self.objective.sample_timesteps(self.schedule, latents.shape[0], latents.device)
        noise = sample_noise(latents, self.objective.offset_noise)
        x_t, target = self.objective.noised_inputs(self.schedule, latents, t, noise)
        x_t = x_t.contiguous(memory_format=self.memory_format)
        if getattr(self.unet, "self_conditioning", False):
            prediction = self.unet(x_t, t, context, x0_estimate=self.self_conditioning_estimate(x_t, t, context))
        else:
            prediction = self.unet(x_t, t, context)  # (B, C, h, w)
        weights = self.objective.weights(self.schedule, t)
        if sample_weights is not None:
            weights = sample_weights if weights is None else weights * sample_weights.to(weights.device)
        return self.objective.loss(prediction, target, weights)

    def prior_preservation_weights(self, batch: dict[str, Any]) -> Tensor | None:
        """Per-sample weights that make the batch mean the DreamBooth loss (Ruiz et al. 2023, Eq. 2):
        E_instance[...] + prior_loss_weight * E_class[...], each mean over its own samples. None for
        batches without a ``prior`` mask (B,) bool (True: a class image of the base model)."""
        prior = batch.get("prior")
        if prior is None:
            return None
        prior = torch.as_tensor(prior, dtype=torch.bool)
        size, priors = prior.numel(), int(prior.sum())
        if priors in (0, size):  # one kind only: its plain mean (times the weight for class images)
            return torch.full((size,), self.prior_loss_weight if priors else 1.0)
        return torch.where(prior, self.prior_loss_weight * size / priors, size / (size - priors))

    @torch.no_grad()
    def self_conditioning_estimate(self, x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """The x_0 estimates a self-conditioning U-Net trains with (Chen et al. 2023, Algorithm 1).

        A ``self_conditioning_rate`` share of the batch gets the network's own x_0 estimate from a first
        pass without gradients (fed zeros); the rest gets zeros, as at a sampler's first step. The first
        pass runs on the chosen rows only, so it costs that share of a forward pass.
        """
        estimate = torch.zeros_like(x_t)
        chosen = (torch.rand(x_t.shape[0]) < self.self_conditioning_rate).nonzero().squeeze(1).to(x_t.device)
        if len(chosen):
            x_chosen, t_chosen = x_t[chosen], t[chosen]
            output = self.unet(x_chosen, t_chosen, context[chosen])
            estimate[chosen] = implied_x0(self.schedule, self.objective.prediction_type, output, x_chosen, t_chosen)
        return estimate

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        latents, context = self.encode_batch(batch, drop_captions=True)
        loss = self.diffusion_loss(latents, context, self.prior_preservation_weights(batch))
        batch_size = latents.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        latents, context = self.encode_batch(batch, drop_captions=False, use_ema=True)
        generator = torch.Generator(device=latents.device).manual_seed(batch_idx)
        # fixed timesteps and noise per batch: the validation loss is comparable across the run
        t = self.objective.sample_timesteps(self.schedule, latents.shape[0], latents.device, generator)
        noise = sample_noise(latents, 0.0, generator)
        x_t, target = self.objective.noised_inputs(self.schedule, latents, t, noise)
        network = self.denoising_network(use_ema=True)
        loss = self.objective.loss(network(x_t, t, context), target, self.objective.weights(self.schedule, t))
        self.log("val/loss", loss, prog_bar=True, batch_size=latents.shape[0], sync_dist=True)

    # validation draws random numbers (VAE posterior samples, any callback's): it must leave the
    # training's generators as it found them, or a run resumed from a checkpoint written just
    # before a validation (which holds the generators of that moment) would diverge from the
    # uninterrupted run
    def on_validation_start(self) -> None:
        self._rng_before_validation = rng_state()

    def on_validation_end(self) -> None:
        if getattr(self, "_rng_before_validation", None) is not None:
            set_rng_state(self._rng_before_validation)
            self._rng_before_validation = None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # right after the update, before any callback's on_train_batch_end can write a checkpoint
        if self.ema is not None and self.global_step % self.ema_every_n_steps == 0:
            self.ema.update_parameters(self.lora if self.lora is not None else self.unet)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if isinstance(optimizer, MuonAdamW) and self._trainer is not None and _shards_parameters(self.trainer.strategy):
            raise UserError(
                f"optim=muon_cosine needs each weight matrix whole on every rank, and strategy "
                f"{type(self.trainer.strategy).__name__} shards them: use optim=adamw_cosine"
            )
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _count_flops(self, batch: dict[str, Any]) -> float:
        """U-Net training FLOPs per batch (for MFU); the frozen encoders' share is not counted."""

        batch_size = len(batch["latent"]) if "latent" in batch else len(batch["image"])
        context_shape = (self.conditioner.max_length, self.conditioner.context_dim)
        if "context" in batch:
            context_shape = tuple(batch["context"].shape[1:])
        return unet_training_flops(self.unet, self.latent_shape, context_shape, batch_size)

    # ---------------------------------------------------------------- sampling
    def pipeline(self, use_ema: bool = True) -> TextToImage:
        """A text-to-image pipeline over the current weights (EMA by default)."""
        return TextToImage(
            self.denoising_network(use_ema),
            self.autoencoder,
            self.text_encoder(use_ema),
            self.schedule,
            self.objective.prediction_type,
            self.latent_shape,
        )

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        # a frozen part is left out only where it can be found again: a file it was loaded from
        left_out = [
            name
            for name in self.frozen_names
            if name in self.frozen_sources and _megabytes(getattr(self, name)) > self.frozen_in_checkpoint_mb
        ]
        for key in [k for k in state if k.split(".", 1)[0] in left_out]:
            del state[key]
        _make_contiguous(checkpoint)
        fingerprints = {name: self.frozen_fingerprint(name) for name in left_out}
        checkpoint["ldm"] = {
            "spec": self.model_spec,  # what sample.py and ldm.convert build the model from
            "lora": self.lora_spec.as_dict(),  # rank 0: a full fine-tune; else the adapters' settings
            "frozen_sources": {
                name: dict(self.frozen_sources[name], fingerprint=fingerprints[name]) for name in left_out
            },
            "frozen_fingerprints": fingerprints,
            "config": self.run_config,  # for people; never read to build anything
            "rng": _gather_rng_states(),  # one entry per rank, for an exact resume
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.context_cache.clear()  # the frozen encoders may be about to change
        self.posterior_cache.clear()
        trained = [
            k for k in self.state_dict() if k.split(".", 1)[0] not in self.frozen_names
        ]  # (a LoRA run: its adapters)
        missing = [k for k in trained if k not in checkpoint["state_dict"]]
        if missing:
            raise UserError(
                f"the checkpoint lacks {len(missing)} weights of this model (e.g. {missing[0]}): "
                f"it was trained with another model config"
            )
        stored = checkpoint.get("ldm", {}).get("frozen_fingerprints", {})
        self._frozen_fingerprints.clear()
        for name in stored:
            expected, actual = stored[name], self.frozen_fingerprint(name)
            if expected != actual:
                raise ValueError(
                    f"checkpoint was trained with a different {name} (fingerprint {expected}, "
                    f"this config builds {actual}): point the config at the same {name} weights"
                )
            for key, value in getattr(self, name).state_dict().items():
                checkpoint["state_dict"].setdefault(f"{name}.{key}", value)
        if self.memory_format == torch.channels_last and not is_sharded(self.unet):  # FSDP2 keeps them contiguous
            _match_channels_last(checkpoint)
        states = checkpoint.get("ldm", {}).get("rng", [])
        # applied at the first resumed step, after Lightning and the data loader have drawn their
        # own numbers, so the step sees exactly the generator state the uninterrupted run had
        world_size = self.trainer.world_size if self._trainer is not None else 1
        self._rng_to_restore = states[self.global_rank] if len(states) == world_size else None

    def frozen_fingerprint(self, name: str) -> str:
        """``fingerprint`` of a frozen part, computed once (seconds for SD's U-Net, at every save otherwise)."""
        if name not in self._frozen_fingerprints:
            self._frozen_fingerprints[name] = fingerprint(getattr(self, name))
        return self._frozen_fingerprints[name]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.flops_per_batch is None:
            self.flops_per_batch = self._count_flops(batch)
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None


def check_image_size(image_size: int, autoencoder: nn.Module, unet: nn.Module) -> None:
    """Refuse an image size the VAE and U-Net cannot halve evenly (it would fail at the first step)."""
    multiple = getattr(autoencoder, "downsampling_factor", 1) * getattr(unet, "downsampling_factor", 1)
    if image_size % multiple:
        raise UserError(
            f"data.image_size={image_size} must be a multiple of {multiple} (the VAE's and the U-Net's "
            f"downsampling): use {max(multiple, image_size // multiple * multiple)} or "
            f"{(image_size // multiple + 1) * multiple}"
        )


def check_prediction_at_zero_snr(schedule: NoiseSchedule, prediction_type: str) -> None:
    """eps-prediction cannot express x_0 where the signal is gone (x_0 = (x_t - sigma eps) / alpha, alpha = 0)."""
    if prediction_type == "eps" and schedule.zero_terminal_snr:
        raise UserError(
            "objective: eps-prediction cannot be trained with schedule.zero_terminal_snr=true (its "
            "last step implies x_0 / 0): use objective=v or objective=x0, or zero_terminal_snr=false"
        )


def _make_contiguous(checkpoint: dict[str, Any]) -> None:
    """Weights and optimiser state in the standard layout (channels_last ones copied), in place.

    Readers need not know the memory format a run trained in, and FSDP2's loader needs it: torch
    2.14's ``set_model_state_dict(broadcast_from_rank0=True)`` gives the other ranks wrong values for
    a channels_last tensor read from a file (``ldm.training.strategies.FSDP2Strategy``)."""

    def contiguous(value: Any) -> Any:
        return value.contiguous() if isinstance(value, Tensor) else value

    checkpoint["state_dict"] = {key: contiguous(value) for key, value in checkpoint["state_dict"].items()}
    for optimizer in checkpoint.get("optimizer_states", []):
        # new dicts: an optimiser's state_dict() hands out its live per-parameter state
        optimizer["state"] = {
            index: {key: contiguous(value) for key, value in per_param.items()}
            for index, per_param in optimizer.get("state", {}).items()
        }


def _match_channels_last(checkpoint: dict[str, Any]) -> None:
    """Optimiser state back in the layout of the parameters it belongs to: with ``task.channels_last``
    every 4-D parameter is channels_last, and checkpoints store its state contiguous. A fused AdamW
    step over mixed layouts takes another vectorised path and rounds differently: the resume would
    no longer be bit-identical. (Weights need nothing: ``load_state_dict`` copies into the live ones.)"""

    def channels_last(value: Any) -> Any:
        return (
            value.contiguous(memory_format=torch.channels_last)
            if isinstance(value, Tensor) and value.ndim == 4
            else value
        )

    for optimizer in checkpoint.get("optimizer_states", []):
        optimizer["state"] = {
            index: {key: channels_last(value) for key, value in per_param.items()}
            for index, per_param in optimizer.get("state", {}).items()
        }


def _megabytes(module: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's generator states, in rank order (on_save_checkpoint runs on all ranks)."""
    state = rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def _shards_parameters(strategy: pl.strategies.Strategy) -> bool:
    """FSDP, FSDP2 and DeepSpeed (ZeRO) hand the optimiser shards instead of whole weight matrices."""
    return getattr(strategy, "shards_parameters", False) or isinstance(
        strategy, (pl.strategies.FSDPStrategy, pl.strategies.DeepSpeedStrategy)
    )
