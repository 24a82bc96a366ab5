"""First stage: train the KL autoencoder (reconstruction + a weak KL to N(0, I)), and pick its latent scale.

The objective is the one of Rombach et al. (2022), Sec. 3.1 and the LDM code, without the patch
discriminator: per image, sum over pixels of the reconstruction error plus `kl_weight` times the KL
summed over latent elements. We divide the whole objective by the number of pixel values D = 3*H*W, which
changes nothing for Adam but makes `rec_loss` read as a per-pixel L1, while `kl_weight` keeps the
paper's meaning (1e-6 in SD's VAE configs).

Optional scale equivariance (Skorokhodov et al. 2025, "Improving the diffusability of autoencoders"):
the decoder must also turn the 2x average-pooled latent into the 2x average-pooled image. A latent
that satisfies this carries no detail finer than the image needs, which makes it easier for a
diffusion model to learn (the plain objective leaves high-frequency patterns in the latent).

Decoder fine-tuning (``trainable="decoder"``): the encoder stays frozen, so every latent, the scaling
factor and any diffusion model trained on them stay valid, and only the decoder learns (as SD's
ft-MSE VAE was made). With ``decoder_latent_noise`` the decoder also learns to turn latents with
Gaussian noise into the clean image (the noise augmentation of cascaded models, Ho et al. 2021): it
forgives a diffusion model's small errors instead of drawing them. With ``decoder_latent_blur`` half
the latents are also blurred first (a Gaussian of per-image std up to that many latent pixels): an
under-trained diffusion model's errors are mostly over-smoothing, regression to the mean, and the
decoder learns to draw the sharp image such a latent came from (the blur augmentation of cascaded
super-resolution models, as in Imagen's and SR3's conditioning augmentation).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchvision.utils import save_image

from ldm.data.transforms import to_model_range
from ldm.models.autoencoder import AutoencoderKL

# (reconstruction, target) -> per-image perceptual distance (B,) or a scalar, e.g. LPIPS.
PerceptualLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TRAINABLE = ("all", "decoder")


class AutoencoderTraining(pl.LightningModule):
    """Trains an `AutoencoderKL` on batches `{"image": (B, 3, H, W) in [-1, 1], ...}` (other keys ignored).

    Logs `train/loss`, `train/rec_loss` (per pixel), `train/kl` (nats per image), `train/latent_std`
    (std of posterior samples; 1 / it is the scaling factor the diffusion stage wants), and in
    validation `val/rec_loss` (L1 per pixel, posterior mean) and `val/psnr` (dB, images in [0, 1]).
    Every `sample_every_n_steps` steps (0: never) a PNG grid of inputs over reconstructions is written
    to `<trainer.log_dir>/reconstructions/`.
    """

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        optimizer: Callable[[Iterator[torch.nn.Parameter]], Optimizer],
        lr_scheduler: Callable[[Optimizer], LRScheduler] | None = None,
        kl_weight: float = 1e-6,  # SD's kl-f8 VAE; larger values trade reconstruction for a smoother latent
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        perceptual_loss: PerceptualLoss | None = None,  # frozen here; none by default (LPIPS needs weights)
        perceptual_weight: float = 1.0,
        equivariance_weight: float = 0.0,  # weight of the 2x-downsampled reconstruction term (0: off)
        trainable: str = "all",  # "decoder": fine-tune post_quant_conv + decoder; the encoder stays as it is
        decoder_latent_noise: float = 0.0,  # > 0: decode z + s * N(0, I), s ~ U(0, this x the latents' std)
        decoder_latent_blur: float = 0.0,  # > 0: half the latents blurred first, std ~ U(0, this) latent pixels
        sample_every_n_steps: int = 0,
        num_samples: int = 8,  # images per reconstruction grid
        run_config: dict | None = None,  # the resolved run config, stored in checkpoints
    ):
        super().__init__()
        self.autoencoder = autoencoder
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.kl_weight = kl_weight
        self.run_config = run_config or {}
        self.flops_per_batch: float | None = None  # read by Lightning's ThroughputMonitor
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight
        self.perceptual_loss = perceptual_loss
        if isinstance(perceptual_loss, torch.nn.Module):
            perceptual_loss.requires_grad_(False).eval()
        self.perceptual_weight = perceptual_weight
        self.equivariance_weight = equivariance_weight
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
        if decoder_latent_noise < 0:
            raise ValueError(f"decoder_latent_noise must be >= 0, got {decoder_latent_noise}")
        if decoder_latent_blur < 0:
            raise ValueError(f"decoder_latent_blur must be >= 0, got {decoder_latent_blur}")
        self.trainable = trainable
        if trainable == "decoder":
            for frozen in (autoencoder.encoder, autoencoder.quant_conv):
                frozen.requires_grad_(False)
        self.decoder_latent_noise = decoder_latent_noise
        self.decoder_latent_blur = decoder_latent_blur
        self.sample_every_n_steps = sample_every_n_steps
        self.num_samples = num_samples

    def train(self, mode: bool = True) -> AutoencoderTraining:
        """Lightning puts the whole module in train mode; the frozen perceptual network stays in eval."""
        super().train(mode)
        if isinstance(self.perceptual_loss, torch.nn.Module):
            self.perceptual_loss.eval()
        return self

    def reconstruction_loss(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted L1 + L2 (+ perceptual) error per pixel value, (B,)."""
        error = reconstruction - target  # (B, 3, H, W)
        loss = self.l1_weight * error.abs().mean(dim=(1, 2, 3))
        if self.l2_weight:
            loss = loss + self.l2_weight * error.square().mean(dim=(1, 2, 3))
        if self.perceptual_loss is not None:
            # A per-image distance is an image-level term: spread it over the D pixel values like the rest.
            distance = self.perceptual_loss(reconstruction, target).reshape(-1)
            loss = loss + self.perceptual_weight * distance / target[0].numel()
        return loss

    def equivariance_loss(self, latent: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction error of the 2x-downsampled image decoded from the 2x-downsampled latent."""
        small_images = F.avg_pool2d(images, 2)
        return self.reconstruction_loss(self.autoencoder.decode(F.avg_pool2d(latent, 2)), small_images).mean()

    def degraded_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """The decoder's input in training: the latent, blurred (``blurred_latent``), then noised
        (``noised_latent``); the latent itself when both options are 0."""
        return self.noised_latent(self.blurred_latent(latent))

    def blurred_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Each latent, with probability 1/2, blurred by a Gaussian of std drawn uniformly in
        [0, decoder_latent_blur] latent pixels; the others (and all when that is 0) unchanged."""
        if not self.decoder_latent_blur:
            return latent
        batch = latent.shape[0]
        stds = torch.rand(batch, device=latent.device) * self.decoder_latent_blur
        stds = stds * (torch.rand(batch, device=latent.device) < 0.5)
        return gaussian_blur(latent, stds, radius=max(1, math.ceil(2 * self.decoder_latent_blur)))

    def noised_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """The latent plus Gaussian noise of a per-image std drawn uniformly in
        [0, decoder_latent_noise x the batch's latent std] (the latent itself when that is 0)."""
        if not self.decoder_latent_noise:
            return latent
        scale = torch.rand(latent.shape[0], 1, 1, 1, device=latent.device, dtype=latent.dtype)
        scale = scale * self.decoder_latent_noise * latent.detach().std()
        return latent + scale * torch.randn_like(latent)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = to_model_range(batch["image"])  # (B, 3, H, W) in [-1, 1]
        posterior = self.autoencoder.encode(images)
        reconstruction = self.autoencoder.decode(self.degraded_latent(posterior.sample()))
        rec_loss = self.reconstruction_loss(reconstruction, images).mean()
        kl = posterior.kl().mean()  # nats per image
        loss = rec_loss + self.kl_weight * kl / images[0].numel()
        if self.equivariance_weight:
            equivariance_loss = self.equivariance_loss(posterior.sample(), images)
            loss = loss + self.equivariance_weight * equivariance_loss
            self.log("train/equivariance_loss", equivariance_loss, batch_size=images.shape[0])

        with torch.no_grad():
            latent_std = posterior.sample().float().std()
        batch_size = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict(
            {"train/rec_loss": rec_loss, "train/kl": kl, "train/latent_std": latent_std}, batch_size=batch_size
        )
        if self.sample_every_n_steps and self.global_step % self.sample_every_n_steps == 0:
            self._save_reconstructions(images, reconstruction)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        images = to_model_range(batch["image"])
        reconstruction = self.autoencoder.decode(self.autoencoder.encode(images).mode())
        error = (reconstruction - images).float()  # (B, 3, H, W)
        # PSNR of the displayable image: clamp to [-1, 1], then map to [0, 1] (error / 2), peak 1.
        mse = ((reconstruction.clamp(-1, 1) - images).float() / 2).square().mean(dim=(1, 2, 3))  # (B,)
        psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
        self.log_dict(
            {"val/rec_loss": error.abs().mean(), "val/psnr": psnr.mean()},
            sync_dist=True,
            prog_bar=True,
            batch_size=images.shape[0],
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ldm"] = {"config": self.run_config}

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(p for p in self.autoencoder.parameters() if p.requires_grad)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def _save_reconstructions(self, images: torch.Tensor, reconstruction: torch.Tensor) -> None:
        # log_dir broadcasts from rank 0, so every rank must ask for it before the others return.
        directory = os.path.join(self.trainer.log_dir or self.trainer.default_root_dir, "reconstructions")
        if not self.trainer.is_global_zero:
            return
        n = min(self.num_samples, images.shape[0])
        grid = torch.cat([images[:n], reconstruction[:n]]).float().clamp(-1, 1) * 0.5 + 0.5  # (2n, 3, H, W)
        os.makedirs(directory, exist_ok=True)
        save_image(grid, os.path.join(directory, f"step_{self.global_step:07d}.png"), nrow=n)


def gaussian_blur(images: torch.Tensor, stds: torch.Tensor, radius: int) -> torch.Tensor:
    """Each image (B, C, H, W) blurred by a separable Gaussian of its own std (B,) in pixels, truncated
    at `radius`, with reflected borders; std 0 leaves an image unchanged."""
    batch, channels, height, width = images.shape
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    exponent = -offsets.square() / (2 * stds.to(images.dtype).clamp(min=1e-6).square()[:, None])  # (B, 2r+1)
    kernels = torch.softmax(exponent, dim=1).repeat_interleave(channels, 0)  # (B C, 2r+1), each sums to 1
    flat = F.pad(images.reshape(1, batch * channels, height, width), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernels[:, None, None, :], groups=batch * channels)  # along x
    flat = F.conv2d(flat, kernels[:, None, :, None], groups=batch * channels)  # along y
    return flat.reshape(batch, channels, height, width)


@torch.no_grad()
def estimate_scaling_factor(
    autoencoder: AutoencoderKL,
    images: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    max_batches: int = 50,
    generator: torch.Generator | None = None,
) -> float:
    """1 / std of posterior samples z ~ q(z|x) over the data: the latent scale for the diffusion stage.

    `images` yields (B, 3, H, W) tensors in [-1, 1] or batches with an "image" key; the std is taken
    over every latent element of up to `max_batches` batches (mean subtracted). Rombach et al. (2022),
    Sec. 4.3.2: rescale the KL-regularised latent to unit variance, z <- z / sigma_hat, sigma_hat
    estimated from data (there, the first batch; SD's 0.18215 is this for its VAE). A `generator`
    must live on the autoencoder's device.
    """
    was_training = autoencoder.training
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    total = total_sq = count = 0.0
    try:
        for batch in itertools.islice(images, max_batches):
            x = to_model_range(batch["image"] if isinstance(batch, Mapping) else batch)
            z = autoencoder.encode(x.to(device)).sample(generator).double()  # float64: sums of many squares
            total += z.sum().item()
            total_sq += z.square().sum().item()
            count += z.numel()
    finally:
        autoencoder.train(was_training)
    if count == 0:
        raise ValueError("estimate_scaling_factor: the image iterable yielded no batches")
    mean = total / count
    std = (total_sq / count - mean**2) ** 0.5
    return 1.0 / std
