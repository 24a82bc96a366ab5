"""A LoRA run (task.lora.rank > 0) of the tiny toy: only the adapters learn, are averaged and saved; the
checkpoint stands alone (the base by reference + fingerprint) and resumes bit for bit; it samples,
converts and exports its adapters with no extra flag, and the exported file on the base model samples
the very same images."""

from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from ldm.checkpoints import load_training_checkpoint, submodule_state
from ldm.convert import main as convert
from ldm.formats import load_bundle
from ldm.formats.lora import apply_loras, lora_from_checkpoint, read_lora
from ldm_testing import TINY_MODEL, TINY_TRAINING, compose_config, run_script, train_tiny_checkpoint
from train import train

STEPS = 4
LORA = [
    "task.lora.rank=4",
    "task.lora.alpha=2",
    "task.lora.targets=[attention,transformer,resblocks]",
    "task.lora.conv_rank=2",
    "task.lora.text_encoder=true",
    "task.frozen_in_checkpoint_mb=0",
]


def _run(out: Path, data: Path, base: Path, max_steps: int, *extra: str):
    cfg = compose_config(
        "train",
        [
            *TINY_MODEL,
            *TINY_TRAINING,
            "~callbacks.sample_grid",
            f"trainer.max_steps={max_steps}",
            "data.num_workers=2",
            "callbacks.checkpoint.every_n_train_steps=2",
            f"model.pretrained={base}",
            *LORA,
            *extra,
        ],
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.data_dir = str(data)
        cfg.data.prepare.num_train, cfg.data.prepare.num_val = 256, 32
    return train(cfg)["task"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_data_dir):
    """(base checkpoint, straight LoRA run's task, resumed run's task, their run directories)."""
    root = tmp_path_factory.mktemp("lora")
    base = train_tiny_checkpoint(root / "base", toy_data_dir, steps=2)
    straight = _run(root / "straight", toy_data_dir, base, STEPS)
    _run(
        root / "interrupted",
        toy_data_dir,
        base,
        STEPS,
        "+callbacks.stop._target_=ldm_testing.StopAfterStep",
        f"+callbacks.stop.step={STEPS // 2}",
    )
    half = root / "interrupted" / "checkpoints" / "step_0000002.ckpt"
    resumed = _run(root / "interrupted", toy_data_dir, base, STEPS, f"resume={half}")
    return base, straight, resumed, root


def test_a_lora_run_resumes_bit_identically(runs):
    _, straight, resumed, root = runs
    for name, a in straight.state_dict().items():
        assert torch.equal(a, resumed.state_dict()[name]), name  # adapters, their EMA (and count), frozen parts
    a = load_training_checkpoint(root / "straight" / "checkpoints" / "last.ckpt")
    b = load_training_checkpoint(root / "interrupted" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    for state_a, state_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_only_the_adapters_are_trained_averaged_and_saved(runs):
    base, straight, _, root = runs
    checkpoint = load_training_checkpoint(root / "straight" / "checkpoints" / "last.ckpt")
    state = checkpoint["state_dict"]
    assert {k.split(".", 1)[0] for k in state} == {"lora", "ema"}  # the base U-Net, VAE and text tower by reference
    assert set(checkpoint["ldm"]["frozen_sources"]) == {"unet", "autoencoder", "conditioner"}
    adapters = [p for p in straight.lora.parameters()]
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(adapters)
    assert {k.removeprefix("ema.module.") for k in state if k.startswith("ema.module.")} == {
        k.removeprefix("lora.") for k in state if k.startswith("lora.")
    }
    assert any(k.startswith("ema.module.text.") for k in state)  # text encoder adapters too
    base_unet = submodule_state(load_training_checkpoint(base)["state_dict"], "ema.module.")
    assert all(torch.equal(v, base_unet[k]) for k, v in straight.unet.state_dict().items())  # never updated
    assert any(p.abs().sum() > 0 for name, p in straight.lora.named_parameters() if name.endswith("up.weight"))


def test_the_checkpoint_samples_as_the_base_with_its_adapters_merged(runs, tmp_path, capsys):
    base, _, _, root = runs
    checkpoint = root / "straight" / "checkpoints" / "last.ckpt"
    bundle = load_bundle(checkpoint)
    base_bundle = load_bundle(base)
    adapters = lora_from_checkpoint(load_training_checkpoint(checkpoint), True, checkpoint)
    expected = apply_loras(base_bundle, [(adapters, 1.0)])
    assert all(torch.equal(bundle.unet[k], expected.unet[k].float()) for k in expected.unet)
    assert any(not torch.equal(bundle.text[k], base_bundle.text[k]) for k in base_bundle.text)

    # its adapters as a kohya file, applied to the base by sample.py, draw the very same pixels
    assert convert([str(checkpoint), str(tmp_path / "toy_lora.safetensors"), "--to", "lora"]) is None
    common = ["prompt=a red circle in the top left", "num_images_per_prompt=2", "steps=2", "device=cpu"]
    assert run_script("sample.py", f"checkpoint={checkpoint}", f"out_dir={tmp_path / 'a'}", *common) == 0
    assert (
        run_script(
            "sample.py",
            f"checkpoint={base}",
            f"lora=[{tmp_path / 'toy_lora.safetensors'}]",
            f"out_dir={tmp_path / 'b'}",
            *common,
        )
        == 0
    )
    import numpy as np
    from PIL import Image

    for name in ("000000.png", "000001.png"):
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "a" / name)), np.asarray(Image.open(tmp_path / "b" / name))
        )
    # the job remembers its LoRAs: another scale into the same folder is refused in one line
    capsys.readouterr()
    assert (
        run_script(
            "sample.py",
            f"checkpoint={base}",
            f"lora=[{tmp_path / 'toy_lora.safetensors'}]",
            "lora_scale=[0.5]",
            f"out_dir={tmp_path / 'b'}",
            *common,
        )
        == 1
    )
    assert "loras" in capsys.readouterr().err


def test_convert_exports_the_merged_model_and_the_adapters_in_both_layouts(runs, tmp_path):
    base, _, _, root = runs
    checkpoint = root / "straight" / "checkpoints" / "last.ckpt"
    convert([str(checkpoint), str(tmp_path / "merged.safetensors"), "--to", "sd"])
    merged = load_bundle(tmp_path / "merged.safetensors")
    assert all(torch.equal(merged.unet[k], v) for k, v in load_bundle(checkpoint).unet.items())
    # --merge-lora on the base gives the same model as the run's checkpoint
    convert([str(checkpoint), str(tmp_path / "lora.safetensors"), "--to", "lora", "--format", "kohya"])
    convert(
        [
            str(base),
            str(tmp_path / "remerged.safetensors"),
            "--to",
            "sd",
            "--merge-lora",
            f"{tmp_path / 'lora.safetensors'}:1",
        ]
    )
    remerged = load_bundle(tmp_path / "remerged.safetensors")
    assert all(torch.allclose(remerged.unet[k], v, atol=1e-6) for k, v in merged.unet.items())
    # the toy's patched U-Net has no diffusers layout: a one-line refusal
    with pytest.raises(SystemExit):
        convert([str(checkpoint), str(tmp_path / "d.safetensors"), "--to", "lora", "--format", "diffusers"])
    back = read_lora(tmp_path / "lora.safetensors", load_bundle(base))
    assert back.metadata["ss_network_dim"] == "4" and back.metadata["ss_steps"] == str(STEPS)


def test_a_full_fine_tune_checkpoint_has_no_adapters_to_export(runs, tmp_path, capsys):
    base, _, _, _ = runs
    with pytest.raises(SystemExit):
        convert([str(base), str(tmp_path / "x.safetensors"), "--to", "lora"])
    assert "task.lora.rank=0" in capsys.readouterr().err


def test_text_encoder_adapters_refuse_precomputed_contexts(train_config):
    from hydra.utils import instantiate

    from ldm.errors import UserError
    from train import resolved_config

    cfg = train_config("task.lora.rank=2", "task.lora.text_encoder=true")
    task = instantiate(cfg.task, _partial_=True, _convert_="all")(run_config=resolved_config(cfg))
    with pytest.raises(UserError, match="data=latents"):
        task.encode_batch({"latent": torch.zeros(1, 4, 4, 4), "context": torch.zeros(1, 77, 32)}, drop_captions=True)


def test_prior_preservation_weights_make_the_dreambooth_loss(train_config):
    # Ruiz et al. 2023, Eq. 2: mean over instance samples + lambda * mean over class samples
    from hydra.utils import instantiate

    from train import resolved_config

    cfg = train_config("task.prior_loss_weight=0.5")
    task = instantiate(cfg.task, _partial_=True, _convert_="all")(run_config=resolved_config(cfg))
    prior = torch.tensor([False, False, False, True])
    weights = task.prior_preservation_weights({"prior": prior})
    losses = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert torch.isclose((weights * losses).mean(), losses[:3].mean() + 0.5 * losses[3])
    assert task.prior_preservation_weights({}) is None


def test_sample_grids_see_the_ema_adapters_as_the_checkpoint_does(runs):
    # the task's pipeline (hooks + EMA adapters, the adapted text encoder) draws what the saved checkpoint
    # (adapters merged into the weights) draws
    from functools import partial

    from ldm.diffusion.samplers import sample_ddim
    from ldm.pipeline import pipeline_from_checkpoint

    _, straight, _, root = runs
    sampler = partial(sample_ddim, eta=0.0)
    prompts, seeds = ["a red circle in the top left", "a blue square in the center"], [1, 2]
    live = straight.pipeline(use_ema=True).sample_latents(prompts, seeds, sampler, 3, 3.0)
    saved, _ = pipeline_from_checkpoint(str(root / "straight" / "checkpoints" / "last.ckpt"))
    expected = saved.sample_latents(prompts, seeds, sampler, 3, 3.0)
    assert torch.allclose(live, expected, atol=1e-4)
    ema_network = straight.denoising_network(use_ema=True)
    assert ema_network.source is straight.ema.module and straight.denoising_network(use_ema=False) is straight.unet
    assert any(not torch.equal(a, b) for a, b in zip(straight.ema.module.parameters(), straight.lora.parameters()))
