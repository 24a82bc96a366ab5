"""The classifier task: toy captions to labels, learning on noisy latents, train.py wiring, safe checkpoints."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from ldm.data.toy import caption, render, sample_spec
from ldm.errors import UserError
from ldm.training.classifier import CLASSIFIER_SPEC, caption_labels, load_classifier
from ldm_testing import TINY_TRAINING, compose_config
from train import resolved_config, train

TINY_CLASSIFIER = [
    "experiment=toy_classifier",
    "model.autoencoder.path=null",
    "model.autoencoder.module.channel_multipliers=[1,1]",
    "model.classifier.model_channels=16",
    *[o for o in TINY_TRAINING if "sample_grid" not in o],
]


def test_captions_map_to_the_toy_class_indices():
    labels = caption_labels(["a red circle in the top left", "a white triangle in the center"])
    assert {k: v.tolist() for k, v in labels.items()} == {"colour": [0, 6], "shape": [0, 2], "position": [0, 4]}
    with pytest.raises(UserError, match="not a toy caption"):
        caption_labels(["a cat"])
    with pytest.raises(UserError, match="not a toy caption"):
        caption_labels(["a pink circle in the center"])


def _toy_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng) for _ in range(n)]
    images = torch.stack([torch.from_numpy(np.array(render(s).resize((32, 32)))).permute(2, 0, 1) for s in specs])
    return {"image": images.float() / 255, "caption": [caption(s) for s in specs]}


def _task(tmp_path, *overrides):
    cfg = compose_config("train", [*TINY_CLASSIFIER, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg, instantiate(cfg.task, _partial_=True, _convert_="all")(run_config=resolved_config(cfg))


def test_loss_falls_on_a_fixed_batch_and_the_vae_stays_frozen(tmp_path):
    _, task = _task(tmp_path)
    batch = _toy_batch(8)
    optimizer = torch.optim.Adam(task.classifier.parameters(), lr=3e-3)
    vae_before = {k: v.clone() for k, v in task.autoencoder.state_dict().items()}

    def loss_at_fixed_noise():
        torch.manual_seed(1)  # the same t and eps for every image each time
        with torch.no_grad():
            return task.losses(batch)[0].item()

    before = loss_at_fixed_noise()
    torch.manual_seed(0)
    for _ in range(25):
        loss, _, _ = task.losses(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss_at_fixed_noise() < 0.9 * before  # at high t the latents hold little: a slow fall
    assert all(torch.equal(v, task.autoencoder.state_dict()[k]) for k, v in vae_before.items())
    assert not any(p.requires_grad for p in task.autoencoder.parameters())


def test_train_py_trains_it_and_its_checkpoint_loads_safely(tmp_path, toy_data_dir):
    cfg = compose_config("train", TINY_CLASSIFIER)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.data_dir = str(toy_data_dir)
        cfg.data.prepare.num_train, cfg.data.prepare.num_val = 256, 32
    result = train(cfg)
    assert "val/acc_colour" in result["metrics"]
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    classifier, spec = load_classifier(path)
    trained = result["task"].classifier.eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        assert all(torch.equal(classifier(x, t)[k], trained(x, t)[k]) for k in spec["classes"])
    assert spec["classes"]["shape"] == ["circle", "square", "triangle"]
    assert spec["schedule"]["zero_terminal_snr"] is True  # the toy model's schedule
    # a spec naming code, or a diffusion checkpoint, is refused in one line
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["ldm"][CLASSIFIER_SPEC]["config"]["_target_"] = "os.system"
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(UserError, match="takes no argument"):
        load_classifier(tmp_path / "bad.ckpt")
    del checkpoint["ldm"][CLASSIFIER_SPEC]
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="not a classifier checkpoint"):
        load_classifier(tmp_path / "other.ckpt")
