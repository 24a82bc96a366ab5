import pytest
import torch
from hydra.utils import instantiate

from ldm.diffusion.parameterization import add_noise, predict_x0, training_target
from ldm.training.ema import EMADecay, build_ema
from ldm.training.latent_diffusion import LatentDiffusion, fingerprint


def _batch(size=32, n=3):
    images = torch.rand(n, 3, size, size) * 2 - 1
    return {"image": images, "caption": ["a red circle in the top left", "a blue square in the center", ""][:n]}


def test_frozen_parts_are_frozen_and_stay_in_eval(task):
    task.train()
    for name in ("autoencoder", "conditioner"):
        module = getattr(task, name)
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert task.unet.training
    optimizer = task.configure_optimizers()["optimizer"]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in task.unet.parameters()}


def test_muon_is_refused_where_the_strategy_shards_weight_matrices(task):
    from types import SimpleNamespace

    import pytorch_lightning as pl

    from ldm.errors import UserError
    from ldm.training.optimizers import MuonAdamW

    assert isinstance(task.configure_optimizers()["optimizer"], MuonAdamW)  # the toy's optimiser
    task._trainer = SimpleNamespace(strategy=pl.strategies.FSDPStrategy())
    with pytest.raises(UserError, match="FSDPStrategy shards them: use optim=adamw_cosine"):
        task.configure_optimizers()


def test_training_step_gives_finite_loss_and_unet_gradients(task):
    task.train()
    latents, context = task.encode_batch(_batch(), drop_captions=False)
    assert latents.shape == (3, *task.latent_shape)
    assert context.shape[:2] == (3, 77)
    loss = task.diffusion_loss(latents, context)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in task.unet.parameters() if p.requires_grad)
    assert all(p.grad is None for p in task.autoencoder.parameters())


def test_diffusion_loss_uses_the_forward_process(task, monkeypatch):
    # a U-Net that returns the exact target (from x_t and the true x0) has zero loss
    latents = torch.randn(2, *task.latent_shape)
    seen = {}

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t, context):
            alpha = task.schedule.alpha(t, 4, like=x_t)
            sigma = task.schedule.sigma(t, 4, like=x_t)
            seen["t"] = t
            eps = (x_t - alpha * latents) / sigma
            return training_target(task.objective.prediction_type, latents, eps, alpha, sigma)

    monkeypatch.setattr(task, "unet", Oracle())
    loss = task.diffusion_loss(latents, torch.zeros(2, 77, 32))
    assert loss.item() < 1e-8
    assert seen["t"].dtype == torch.long and 0 <= seen["t"].min() and seen["t"].max() < 1000


def _self_conditioning_task(train_config, rate):
    cfg = train_config("model.unet.self_conditioning=true", "model.prediction_type=v")
    task = instantiate(cfg.task, _partial_=True, _convert_="all")(run_config={}, self_conditioning_rate=rate)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in task.unet.parameters():  # the zero-initialised output conv included
            p.normal_(0.0, p[0].numel() ** -0.5 if p.ndim > 1 else 0.1)
    return task.train()


def _noised(task, n=8):
    x_t = torch.randn(n, *task.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 10, 300, 999] * (n // 4))
    return x_t, t, torch.randn(n, 77, task.conditioner.context_dim)


def test_self_conditioning_estimate_is_the_networks_own_x0_on_the_chosen_rows(train_config):
    task = _self_conditioning_task(train_config, rate=0.5)
    x_t, t, context = _noised(task)
    torch.manual_seed(3)
    chosen = torch.rand(len(t)) < 0.5  # the draw the task is about to make
    torch.manual_seed(3)
    estimate = task.self_conditioning_estimate(x_t, t, context)
    assert 0 < chosen.sum() < len(t)
    with torch.no_grad():
        output = task.unet(x_t, t, context)  # fed zeros, as the first pass is
    alpha, sigma = task.schedule.alpha(t, 4, like=x_t), task.schedule.sigma(t, 4, like=x_t)
    own_x0 = predict_x0("v", output, x_t, alpha, sigma)
    torch.testing.assert_close(estimate[chosen], own_x0[chosen], rtol=1e-4, atol=1e-5)  # batch of the rows alone
    assert not estimate[~chosen].any()
    assert not estimate.requires_grad
    assert not _self_conditioning_task(train_config, rate=0.0).self_conditioning_estimate(x_t, t, context).any()


def test_self_conditioned_loss_trains_the_weights_that_read_the_estimate(train_config):
    task = _self_conditioning_task(train_config, rate=1.0)
    x_t, _, context = _noised(task)
    task.diffusion_loss(x_t, context).backward()
    conv_in = task.unet.input_blocks[0][0].weight.grad  # (C, 2 x 4 x p^2, 3, 3): x_t's channels, then the estimate's
    assert conv_in[:, conv_in.shape[1] // 2 :].abs().sum() > 0


def test_self_conditioning_rate_is_checked(train_config):
    cfg = train_config()
    with pytest.raises(ValueError, match="self_conditioning_rate"):
        instantiate(cfg.task, _partial_=True, _convert_="all")(run_config={}, self_conditioning_rate=1.5)


def test_caption_dropout_rate():
    dropped = LatentDiffusion.drop_captions
    holder = type("H", (), {"caption_dropout": 0.25})()
    torch.manual_seed(0)
    out = dropped(holder, ["x"] * 20_000)
    assert out.count("") / len(out) == pytest.approx(0.25, abs=0.01)
    holder.caption_dropout = 0.0
    assert dropped(holder, ["x", "y"]) == ["x", "y"]


def test_precomputed_latents_skip_the_encoders(task):
    batch = {"latent": torch.randn(2, *task.latent_shape), "context": torch.randn(2, 77, 32)}
    latents, context = task.encode_batch(batch, drop_captions=True)
    assert latents is batch["latent"] and context is batch["context"]


def test_ema_update_with_warmup():
    net = torch.nn.Linear(2, 2)
    ema = build_ema(net, decay=0.9, warmup=True)
    ema.update_parameters(net)  # first update copies
    assert torch.equal(ema.module.weight, net.weight)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update_parameters(net)  # n = 1: decay min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module.weight, d * before + (1 - d) * net.weight)
    assert not any(p.requires_grad for p in ema.parameters())


def test_ema_decay_without_warmup_is_constant():
    update = EMADecay(0.99, warmup=False)
    ema, new = [torch.zeros(3)], [torch.ones(3)]
    update(ema, new, torch.tensor(5))
    assert torch.allclose(ema[0], torch.full((3,), 0.01))
    with pytest.raises(ValueError):
        EMADecay(1.0)


def test_fingerprint_detects_changed_weights(task):
    before = fingerprint(task.autoencoder)
    assert fingerprint(task.autoencoder) == before
    with torch.no_grad():
        next(task.autoencoder.parameters()).add_(1e-3)
    assert fingerprint(task.autoencoder) != before


def test_small_frozen_parts_stay_in_checkpoints(task):
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    assert any(k.startswith("autoencoder.") for k in checkpoint["state_dict"])
    assert checkpoint["ldm"]["frozen_fingerprints"] == {}


def test_checkpoint_hooks_drop_and_restore_large_frozen_weights(task):
    task.frozen_in_checkpoint_mb = 0.0
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    # the seeded text tower can be rebuilt from the spec; the tiny VAE's random weights cannot
    assert not any(k.startswith("conditioner.") for k in checkpoint["state_dict"])
    assert any(k.startswith("autoencoder.") for k in checkpoint["state_dict"])
    assert checkpoint["ldm"]["frozen_sources"]["conditioner"]["kind"] == "seeded"
    assert any(k.startswith("ema.module.") for k in checkpoint["state_dict"])
    task.on_load_checkpoint(checkpoint)
    task.load_state_dict(checkpoint["state_dict"], strict=True)
    checkpoint["ldm"]["frozen_fingerprints"]["conditioner"] = "0" * 16
    with pytest.raises(ValueError, match="different conditioner"):
        task.on_load_checkpoint(checkpoint)


def test_noising_matches_closed_form(task):
    x0 = torch.randn(4, *task.latent_shape)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    x_t, target = task.objective.noised_inputs(task.schedule, x0, t, eps)
    abar = task.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, atol=1e-6)
    assert torch.equal(x_t, add_noise(x0, eps, abar.sqrt(), (1 - abar).sqrt())) or torch.allclose(
        x_t, add_noise(x0, eps, abar.sqrt(), (1 - abar).sqrt()), atol=1e-6
    )


def test_compile_unet_compiles_the_trained_unet_in_place(train_config, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **options: compiled.append((module, options)))
    cfg = train_config("task.compile_unet={mode: max-autotune}")
    task = instantiate(cfg.task, _partial_=True, _convert_="all")(run_config={})
    assert compiled == [(task.unet, {"mode": "max-autotune"})]  # not the EMA copy, which samples eagerly
    assert all(not k.startswith("unet._orig_mod") for k in task.state_dict())


def test_ema_model_matches_torchs_averaged_model_update():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))  # float and integer buffers
    ours = build_ema(net, decay=0.9, warmup=True)
    reference = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=EMADecay(0.9, True), use_buffers=True)
    for _ in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(5, 3))  # moves the running statistics and num_batches_tracked
        ours.update_parameters(net)
        reference.update_parameters(net)
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
