"""AutoencoderTraining through a real Lightning Trainer, and the latent scale estimate."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.models.autoencoder import AutoencoderKL
from ldm.training.autoencoder import AutoencoderTraining, estimate_scaling_factor, gaussian_blur


def _tiny_autoencoder() -> AutoencoderKL:
    return AutoencoderKL(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1, resolution=16)


def _samples(n: int, size: int = 16, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    # Smooth-ish images (upsampled noise) so a tiny VAE can fit them in a few steps.
    images = torch.nn.functional.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=gen), size=size)
    return [{"image": image * 2 - 1, "caption": f"image {i}"} for i, image in enumerate(images)]


def _collate(samples: list[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]), "caption": [s["caption"] for s in samples]}


def _loader(samples: list[dict], batch_size: int = 4) -> DataLoader:
    return DataLoader(samples, batch_size=batch_size, shuffle=False, collate_fn=_collate)


def _trainer(tmp_path, max_steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_trains_validates_and_writes_reconstruction_grids(tmp_path):
    torch.manual_seed(0)
    module = AutoencoderTraining(
        _tiny_autoencoder(),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        lr_scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda step: 1.0),
        l2_weight=0.5,
        sample_every_n_steps=2,
        num_samples=2,
    )
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, _loader(_samples(4)), _loader(_samples(4, seed=1)))

    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/rec_loss", "train/kl", "train/latent_std", "val/rec_loss", "val/psnr"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["val/psnr"] > 0
    grids = sorted(p.name for p in (tmp_path / "reconstructions").iterdir())
    assert grids == ["step_0000000.png", "step_0000002.png"]


@pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*")
def test_loss_decreases_on_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    module = AutoencoderTraining(_tiny_autoencoder(), optimizer=partial(torch.optim.Adam, lr=2e-3))
    recorder = LossRecorder()
    trainer = _trainer(tmp_path, max_steps=30, callbacks=[recorder], limit_val_batches=0)
    trainer.fit(module, _loader(_samples(4)))  # one batch per epoch: the same 4 images every step

    assert len(recorder.losses) == 30
    first, last = recorder.losses[0], sum(recorder.losses[-5:]) / 5
    assert last < 0.5 * first, recorder.losses


def test_perceptual_term_is_added_per_pixel():
    module = AutoencoderTraining(
        _tiny_autoencoder(),
        optimizer=torch.optim.Adam,
        l1_weight=0.0,
        perceptual_loss=lambda reconstruction, target: torch.full((target.shape[0],), 3.0 * 16 * 16 * 3),
        perceptual_weight=2.0,
    )
    x = torch.zeros(2, 3, 16, 16)
    torch.testing.assert_close(module.reconstruction_loss(x, x), torch.full((2,), 6.0))


def _known_posterior_autoencoder(means: list[float], logvar: float) -> AutoencoderKL:
    """An autoencoder whose posterior ignores the image: quant_conv outputs only its bias."""
    vae = _tiny_autoencoder()
    with torch.no_grad():
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.copy_(torch.tensor(means + [logvar] * len(means)))
    return vae


def test_estimate_scaling_factor_recovers_a_known_std():
    # Channel means 3, 1, 3, 1 (mean 2, variance 1) plus posterior noise of variance 0.25:
    # the latent std over all elements is sqrt(1.25), whatever the offset.
    vae = _known_posterior_autoencoder([3.0, 1.0, 3.0, 1.0], logvar=float(torch.tensor(0.25).log()))
    batches = [torch.zeros(8, 3, 16, 16)] * 20  # 20 * 8 * 4*8*8 = 40960 latent values
    estimate = estimate_scaling_factor(vae, batches, max_batches=20, generator=torch.Generator().manual_seed(0))
    assert estimate == pytest.approx(1 / 1.25**0.5, rel=0.02)


def test_estimate_scaling_factor_reads_dict_batches_and_stops_at_max_batches():
    vae = _known_posterior_autoencoder([0.0] * 4, logvar=float(torch.tensor(4.0).log())).train()
    consumed = []

    def batches():
        for i in range(100):
            consumed.append(i)
            yield {"image": torch.zeros(8, 3, 16, 16), "caption": ["x"] * 8}

    estimate = estimate_scaling_factor(vae, batches(), max_batches=10, generator=torch.Generator().manual_seed(0))
    assert estimate == pytest.approx(0.5, rel=0.03)
    assert len(consumed) == 10
    assert vae.training  # mode restored


def test_estimate_scaling_factor_rejects_empty_data():
    with pytest.raises(ValueError, match="no batches"):
        estimate_scaling_factor(_tiny_autoencoder(), [], max_batches=5)


class _L2Distance(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.scale * (reconstruction - target).square().sum(dim=(1, 2, 3))


def test_perceptual_network_stays_frozen_and_in_eval():
    distance = _L2Distance()
    module = AutoencoderTraining(_tiny_autoencoder(), optimizer=torch.optim.Adam, perceptual_loss=distance).train()
    assert module.autoencoder.training and not distance.training
    assert not distance.scale.requires_grad


def test_equivariance_term_decodes_the_pooled_latent_to_the_pooled_image():
    torch.manual_seed(0)
    vae = _tiny_autoencoder()
    module = AutoencoderTraining(vae, optimizer=torch.optim.Adam, l2_weight=1.0)
    latent, images = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 16, 16) * 2 - 1
    pooled_latent = latent.reshape(2, 4, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 block means, by hand
    pooled_images = images.reshape(2, 3, 8, 2, 8, 2).mean(dim=(3, 5))
    error = vae.decode(pooled_latent) - pooled_images  # (2, 3, 8, 8): the f = 2 decoder halves 16 -> 8
    expected = (error.abs() + error.square()).mean()
    torch.testing.assert_close(module.equivariance_loss(latent, images), expected)


@pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*")
def test_equivariance_term_is_added_to_the_training_loss(tmp_path):
    # A posterior with a negligible std makes both reconstructions deterministic, so the step's loss can
    # be recomputed term by term: reconstruction + KL + weight * equivariance.
    vae = _known_posterior_autoencoder([0.5, -0.5, 0.25, 0.0], logvar=-40.0)
    module = AutoencoderTraining(vae, optimizer=partial(torch.optim.SGD, lr=0.0), equivariance_weight=3.0)
    recorder = LossRecorder()
    batch = _samples(2)
    _trainer(tmp_path, max_steps=1, callbacks=[recorder], limit_val_batches=0).fit(module, _loader(batch, 2))

    images = torch.stack([s["image"] for s in batch])
    with torch.no_grad():
        reconstruction, posterior = vae(images, sample_posterior=False)
        expected = (
            module.reconstruction_loss(reconstruction, images).mean()
            + module.kl_weight * posterior.kl().mean() / images[0].numel()
            + 3.0 * module.equivariance_loss(posterior.mode(), images)
        )
    assert recorder.losses[0] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*")
def test_decoder_fine_tuning_leaves_the_encoder_and_trains_the_decoder(tmp_path):
    torch.manual_seed(0)
    vae = _tiny_autoencoder()
    before = {name: value.clone() for name, value in vae.state_dict().items()}
    module = AutoencoderTraining(
        vae, optimizer=partial(torch.optim.Adam, lr=1e-2), trainable="decoder", decoder_latent_noise=0.5
    )
    _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, _loader(_samples(8)))

    for name, value in vae.state_dict().items():
        unchanged = torch.equal(value, before[name])
        assert unchanged == name.startswith(("encoder.", "quant_conv.")), name
    optimised = {id(p) for group in module.optimizers().optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in (*vae.post_quant_conv.parameters(), *vae.decoder.parameters())}


def test_decoder_latent_noise_has_a_per_image_std_up_to_its_bound():
    torch.manual_seed(0)
    latent = torch.randn(400, 4, 16, 16) * 3.0  # latent std 3: noise std up to 0.5 * 3 = 1.5
    plain = AutoencoderTraining(_tiny_autoencoder(), optimizer=torch.optim.Adam)
    assert plain.noised_latent(latent) is latent

    noisy = AutoencoderTraining(_tiny_autoencoder(), optimizer=torch.optim.Adam, decoder_latent_noise=0.5)
    per_image_std = (noisy.noised_latent(latent) - latent).flatten(1).std(dim=1)  # (400,)
    assert per_image_std.max() < 1.5 * 1.05
    # uniform in [0, 1.5]: mean 0.75, and both ends of the range are reached
    assert per_image_std.mean().item() == pytest.approx(0.75, abs=0.06)
    assert per_image_std.min() < 0.1 and per_image_std.max() > 1.35


def test_trainable_and_noise_options_are_checked():
    with pytest.raises(ValueError, match="trainable"):
        AutoencoderTraining(_tiny_autoencoder(), optimizer=torch.optim.Adam, trainable="encoder")
    with pytest.raises(ValueError, match="decoder_latent_noise"):
        AutoencoderTraining(_tiny_autoencoder(), optimizer=torch.optim.Adam, decoder_latent_noise=-0.1)
    with pytest.raises(ValueError, match="decoder_latent_blur"):
        AutoencoderTraining(_tiny_autoencoder(), optimizer=torch.optim.Adam, decoder_latent_blur=-1.0)


def test_gaussian_blur_is_torchvisions_per_image_and_zero_std_is_the_identity():
    from torchvision.transforms.functional import gaussian_blur as torchvision_blur

    images = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(images, torch.tensor([0.0, 0.7, 1.5]), radius=3)
    assert torch.allclose(blurred[0], images[0], atol=1e-6)
    for i, std in ((1, 0.7), (2, 1.5)):  # same Gaussian, 7 taps, reflected borders
        torch.testing.assert_close(blurred[i], torchvision_blur(images[i], [7, 7], [std, std]), atol=1e-5, rtol=1e-5)
    constant = torch.full((2, 1, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(constant, torch.tensor([1.0, 2.0]), radius=2), constant)
    images.requires_grad_()  # a fully trained VAE (trainable=all) learns its encoder through the blur too
    gaussian_blur(images, torch.tensor([0.0, 0.7, 1.5]), radius=3).sum().backward()
    interior = images.grad[..., 4:-4, 4:-4]  # beyond the reach of the reflected borders each kernel sums to 1
    torch.testing.assert_close(interior, torch.ones_like(interior))


def test_decoder_latent_blur_blurs_half_the_latents_by_at_most_its_bound():
    torch.manual_seed(0)
    impulse = torch.zeros(400, 1, 15, 15)
    impulse[:, :, 7, 7] = 1.0
    plain = AutoencoderTraining(_tiny_autoencoder(), optimizer=torch.optim.Adam)
    assert plain.degraded_latent(impulse) is impulse

    blurring = AutoencoderTraining(_tiny_autoencoder(), optimizer=torch.optim.Adam, decoder_latent_blur=1.0)
    spread = blurring.blurred_latent(impulse)  # each image: the blur's own kernel
    offsets = torch.arange(15.0) - 7
    variance_x = (spread.sum(dim=(1, 2)) * offsets.square()).sum(dim=1)  # (400,): the kernel's std^2 along x
    unchanged = torch.isclose(spread, impulse, atol=1e-6).flatten(1).all(dim=1)
    assert 0.4 < unchanged.float().mean() < 0.6  # half untouched, half blurred
    assert variance_x.max() <= 1.0 + 1e-4 and variance_x[~unchanged].mean() > 0.2
