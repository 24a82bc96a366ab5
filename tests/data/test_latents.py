"""Precomputed latent shards: writing (data_scripts/precompute_latents.py), reading, the model check, training."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra.utils import instantiate

from ldm.checkpoints import fingerprint, save_safetensors
from ldm.data.latent_format import LatentsMismatchError, check_latents_match, read_shard_meta
from ldm.data.latent_writer import precompute_latents
from ldm.data.latents import LatentShardDataModule
from ldm.data.webdataset import ShardDataModule
from ldm.errors import UserError
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.conditioners import OpenCLIPTextEncoder
from ldm_testing import ROOT, TINY_MODEL, TINY_TRAINING, compose_config, run_script

SIZE = 32  # TINY_TRAINING's data.image_size: 16x16 latents with the tiny VAE (f = 2)
NAMES = ["train-000000.tar", "train-000001.tar", "val-000000.tar"]


def _load_script():
    spec = importlib.util.spec_from_file_location("precompute_latents", ROOT / "data_scripts" / "precompute_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()


@pytest.fixture(scope="module")
def model_overrides(tmp_path_factory) -> list[str]:
    """TINY_MODEL with its random VAE saved to a file, so every process builds the same one."""
    cfg = compose_config("precompute", TINY_MODEL)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "tiny_vae.safetensors"
    save_safetensors(instantiate(cfg.model.autoencoder).state_dict(), path)
    return [o for o in TINY_MODEL if not o.startswith("model.autoencoder.path=")] + [f"model.autoencoder.path={path}"]


def precompute_config(model_overrides, toy_data_dir, out, *overrides):
    toy = toy_data_dir / "toy"
    return compose_config(
        "precompute",
        [
            *model_overrides,
            f"data.shards={toy}/train-*.tar",
            f"data.val_shards={toy}/val-*.tar",
            "data.prepare=null",
            f"data.image_size={SIZE}",
            f"out={out}",
            "batch_size=32",
            "num_workers=0",
            "device=cpu",
            "progress=false",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def frozen(model_overrides):
    """(autoencoder, conditioner) as the precompute config builds them."""
    cfg = compose_config("precompute", model_overrides)
    return instantiate(cfg.model.autoencoder).eval(), instantiate(cfg.model.conditioner).eval()


@pytest.fixture(scope="module")
def latents_dir(model_overrides, toy_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    report = script.precompute(precompute_config(model_overrides, toy_data_dir, out))
    assert [p.name for p in report.written] == NAMES and report.num_samples == 288
    return out


def _raw_samples(path: Path) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()))


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_shards_hold_posteriors_contexts_captions_and_meta(latents_dir, frozen, toy_data_dir):
    autoencoder, conditioner = frozen
    assert sorted(p.name for p in latents_dir.iterdir()) == NAMES
    samples = _raw_samples(latents_dir / "val-000000.tar")
    inputs = _raw_samples(toy_data_dir / "toy" / "val-000000.tar")
    meta, samples = samples[0], samples[1:]
    assert meta["__key__"] == "__meta__" and len(samples) == 32
    for sample, source in zip(samples, inputs):
        assert sample["__key__"] == source["__key__"]
        assert sample["txt"] == source["txt"] and sample["json"] == source["json"]
        mean, logvar, context = (_npy(sample[k]) for k in ("mean.npy", "logvar.npy", "context.npy"))
        assert mean.shape == logvar.shape == (4, SIZE // 2, SIZE // 2) and mean.dtype == logvar.dtype == np.float32
        assert context.shape == (77, 32) and context.dtype == np.float16
    recorded = json.loads(meta["json"])
    assert recorded["store"] == "distribution" and recorded["image_size"] == SIZE
    assert recorded["scaling_factor"] == autoencoder.scaling_factor
    assert recorded["autoencoder"]["fingerprint"] == fingerprint(autoencoder)
    assert recorded["conditioner"]["fingerprint"] == fingerprint(conditioner)
    assert recorded["conditioner"]["config"]["text_cfg"]["width"] == 32  # the model config, for people
    assert recorded["source"] == str(toy_data_dir / "toy" / "val-000000.tar")


def test_stored_posterior_and_context_equal_the_online_encoding(latents_dir, frozen, toy_data_dir):
    autoencoder, conditioner = frozen
    toy = toy_data_dir / "toy"
    images = ShardDataModule(  # the on-the-fly image path, batched as the precompute was (32)
        shards=str(toy / "train-*.tar"),
        val_shards=str(toy / "val-*.tar"),
        image_size=SIZE,
        batch_size=32,
        num_workers=0,
    )
    images.setup("fit")
    batch = images.on_after_batch_transfer(next(iter(images.val_dataloader())), 0)  # as Lightning hands it over
    samples = _raw_samples(latents_dir / "val-000000.tar")[1:]
    stored_mean = torch.from_numpy(np.stack([_npy(s["mean.npy"]) for s in samples]))
    stored_logvar = torch.from_numpy(np.stack([_npy(s["logvar.npy"]) for s in samples]))
    stored_context = torch.from_numpy(np.stack([_npy(s["context.npy"]) for s in samples]))
    with torch.no_grad():
        posterior = autoencoder.encode(batch["image"])
        assert torch.equal(stored_mean, posterior.mean) and torch.equal(stored_logvar, posterior.logvar)
        assert torch.equal(autoencoder.decode(stored_mean), autoencoder.decode(posterior.mean))
        assert torch.equal(stored_context, conditioner(batch["caption"]).half())


def test_store_sample_writes_one_scaled_posterior_draw_reproducibly(
    model_overrides, toy_data_dir, latents_dir, tmp_path
):
    for run in ("a", "b"):
        script.precompute(
            precompute_config(
                model_overrides,
                toy_data_dir,
                tmp_path / run,
                "store=sample",
                "data.shards=null",
                f"data.val_shards={toy_data_dir}/toy/val-*.tar",
            )
        )
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # same seed: byte-identical
    meta, _ = read_shard_meta(str(tmp_path / "a" / "val-000000.tar"))
    drawn = _raw_samples(tmp_path / "a" / "val-000000.tar")[1:]
    posteriors = _raw_samples(latents_dir / "val-000000.tar")[1:]
    eps = np.stack(
        [
            (_npy(d["latent.npy"]) / meta["scaling_factor"] - _npy(p["mean.npy"])) / np.exp(0.5 * _npy(p["logvar.npy"]))
            for d, p in zip(drawn, posteriors)
        ]
    )
    assert meta["store"] == "sample" and "mean.npy" not in drawn[0]
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05  # z = mean + std * N(0, I)


def test_unusable_inputs_are_dropped_and_counted_as_the_image_pipeline_does(frozen, toy_data_dir, tmp_path):
    good = _raw_samples(toy_data_dir / "toy" / "val-000000.tar")[:2]
    with wds.TarWriter(str(tmp_path / "in.tar")) as sink:
        sink.write({"__key__": "a", "png": good[0]["png"], "txt": good[0]["txt"]})
        sink.write({"__key__": "b", "png": b"not an image", "txt": b"a red circle in the center"})
        sink.write({"__key__": "c", "png": good[1]["png"], "txt": b"  "})
    report = precompute_latents(
        *frozen, {"train": str(tmp_path / "in.tar")}, tmp_path / "out", image_size=SIZE, device="cpu", progress=False
    )
    assert report.num_samples == 1 and report.dropped == {"skipped/corrupt_image": 1, "skipped/empty_caption": 1}
    assert [s["__key__"] for s in _raw_samples(tmp_path / "out" / "train-000000.tar")] == ["__meta__", "a"]


def test_rerun_skips_complete_shards_and_matches_a_fresh_run(model_overrides, toy_data_dir, latents_dir, tmp_path):
    # a killed run: one shard renamed into place, another left as a temporary file
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy2(latents_dir / "train-000000.tar", out / "train-000000.tar")
    (out / ".train-000001.tar.x1y2.tmp").write_bytes(b"half a shard")
    before = os.stat(out / "train-000000.tar")
    report = script.precompute(precompute_config(model_overrides, toy_data_dir, out))
    assert [p.name for p in report.skipped] == ["train-000000.tar"]
    assert [p.name for p in report.written] == ["train-000001.tar", "val-000000.tar"]
    after = os.stat(out / "train-000000.tar")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert _files(out) == _files(latents_dir)  # the temporary file is gone, the rest byte-identical


def test_rerun_with_another_model_refuses_existing_shards(model_overrides, toy_data_dir, latents_dir, tmp_path):
    shutil.copytree(latents_dir, tmp_path / "out")
    cfg = precompute_config(model_overrides, toy_data_dir, tmp_path / "out", "model.conditioner.init_seed=1")
    with pytest.raises(UserError, match="made by another run .*conditioner"):
        script.precompute(cfg)


def test_two_ranks_from_the_environment_write_disjoint_complete_halves(
    model_overrides, toy_data_dir, latents_dir, tmp_path, monkeypatch
):
    # with decoding workers too: a worker takes whole shards, so the output does not depend on them
    cfg = precompute_config(model_overrides, toy_data_dir, tmp_path / "out", "num_workers=2")
    written = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        written.append({p.name for p in script.precompute(cfg).written})
    assert written[0] and written[1] and not written[0] & written[1]
    assert written[0] | written[1] == set(NAMES)
    assert _files(tmp_path / "out") == _files(latents_dir)


def test_cli_reports_a_missing_input_in_one_line(model_overrides, tmp_path, capsys):
    status = run_script(
        "data_scripts/precompute_latents.py",
        *model_overrides,
        "data.prepare=null",
        f"data.shards='{tmp_path}/nothing-{{000..003}}.tar'",
        f"out={tmp_path}/out",
        "progress=false",
    )
    stderr = capsys.readouterr().err
    assert status == 1, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("error: no shard found") and "nothing-" in stderr
    assert "Traceback" not in stderr


def test_datamodule_batches_go_straight_through_encode_batch(latents_dir, model_overrides, frozen):
    datamodule = LatentShardDataModule(
        shards=str(latents_dir / "train-*.tar"),
        val_shards=str(latents_dir / "val-*.tar"),
        image_size=SIZE,
        batch_size=8,
        num_workers=0,
        shuffle_buffer=16,
        caption_dropout=0.5,
    )
    datamodule.setup("fit")
    batches = [b for _, b in zip(range(4), datamodule.train_dataloader())]
    batch = batches[0]
    assert batch["latent"].shape == (8, 4, SIZE // 2, SIZE // 2) and batch["latent"].dtype == torch.float32
    assert batch["context"].shape == (8, 77, 32) and batch["context"].dtype == torch.float32
    assert len(batch["caption"]) == 8

    # dropped captions carry the empty prompt's context (the task's caption dropout, done here)
    _, conditioner = frozen
    with torch.no_grad():
        empty = conditioner([""])[0]
    dropped = [(b["context"][i], c) for b in batches for i, c in enumerate(b["caption"]) if c == ""]
    assert 4 <= len(dropped) <= 28 and all(torch.equal(context, empty) for context, _ in dropped)

    cfg = compose_config("train", [*model_overrides, *TINY_TRAINING, "data=latents", "data.shards=x"])
    task = instantiate(cfg.task, _partial_=True, _convert_="all")(run_config={})
    latents, context = task.encode_batch(batch, drop_captions=True)
    assert latents is batch["latent"] and context is batch["context"]
    assert torch.isfinite(task.diffusion_loss(latents, context))

    val = [next(iter(datamodule.val_dataloader()))["latent"] for _ in range(2)]
    assert sum(len(b["caption"]) for b in datamodule.val_dataloader()) == 32
    assert torch.equal(val[0], val[1])  # validation draws a fixed z per sample


def test_model_check_names_the_mismatch(latents_dir, frozen):
    autoencoder, conditioner = frozen
    meta, empty = read_shard_meta(str(latents_dir / "train-000000.tar"))
    check_latents_match(meta, autoencoder, conditioner, empty)  # the model that made them

    other_text = OpenCLIPTextEncoder(model_name=None, text_cfg=meta["conditioner"]["config"]["text_cfg"], init_seed=1)
    with pytest.raises(LatentsMismatchError, match=r"different conditioner \(fingerprint") as error:
        check_latents_match(meta, autoencoder, other_text)
    assert "\n" not in str(error.value)

    rescaled = copy.deepcopy(autoencoder)
    rescaled.scaling_factor = 0.5  # not in the weights
    with pytest.raises(LatentsMismatchError, match="scaled by 0.32032"):
        check_latents_match(meta, rescaled, conditioner)

    text_cfg = meta["conditioner"]["config"]["text_cfg"]
    padded = OpenCLIPTextEncoder(model_name=None, text_cfg=text_cfg, pad_token_id=49407)
    with pytest.raises(LatentsMismatchError, match="pad_token_id=0"):
        check_latents_match(meta, autoencoder, padded)
    # an option the weights and attributes do not show: only the empty-prompt context tells
    quick_gelu = OpenCLIPTextEncoder(model_name=None, text_cfg=text_cfg, quick_gelu=True)
    assert fingerprint(quick_gelu) == fingerprint(conditioner)
    with pytest.raises(LatentsMismatchError, match="empty prompt"):
        check_latents_match(meta, autoencoder, quick_gelu, empty)


def _train_config(model_overrides, latents_dir, tmp_path, *overrides):
    training = [o for o in TINY_TRAINING if not o.startswith("callbacks.sample_grid")]
    cfg = compose_config(
        "train",
        [
            *model_overrides,
            *training,
            "data=latents",
            f"data.shards={latents_dir}/train-*.tar",
            f"data.val_shards={latents_dir}/val-*.tar",
            "~callbacks.sample_grid",
            *overrides,
        ],
    )
    cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def test_train_on_latents_never_runs_the_vae_encoder_or_encodes_a_caption(
    model_overrides, latents_dir, tmp_path, monkeypatch
):
    from train import train

    def no_encoder(self, x):
        raise AssertionError("the VAE encoder ran during training on latents")

    prompts = []
    forward = OpenCLIPTextEncoder.forward
    monkeypatch.setattr(AutoencoderKL, "encode", no_encoder)
    monkeypatch.setattr(OpenCLIPTextEncoder, "forward", lambda self, p: prompts.append(list(p)) or forward(self, p))
    result = train(_train_config(model_overrides, latents_dir, tmp_path))
    assert result["trainer"].global_step == 4
    assert np.isfinite(result["metrics"]["train/loss"]) and np.isfinite(result["metrics"]["val/loss"])
    assert prompts == [[""]]  # only the setup check's empty prompt


def test_train_refuses_latents_of_another_text_encoder(model_overrides, latents_dir, tmp_path):
    from train import train

    cfg = _train_config(model_overrides, latents_dir, tmp_path, "model.conditioner.init_seed=1")
    with pytest.raises(LatentsMismatchError, match="different conditioner"):
        train(cfg)


@pytest.fixture(scope="module")
def flipped_latents_dir(model_overrides, toy_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flipped_latents")
    report = script.precompute(precompute_config(model_overrides, toy_data_dir, out, "flips=true"))
    assert [p.name for p in report.written] == NAMES
    return out


def test_flips_store_the_flipped_images_posterior_beside_the_image_one(
    flipped_latents_dir, latents_dir, frozen, toy_data_dir
):
    autoencoder, _ = frozen
    toy = toy_data_dir / "toy"
    images = ShardDataModule(
        shards=str(toy / "train-*.tar"),
        val_shards=str(toy / "val-*.tar"),
        image_size=SIZE,
        batch_size=32,
        num_workers=0,
    )
    images.setup("fit")
    batch = images.on_after_batch_transfer(next(iter(images.val_dataloader())), 0)
    samples = _raw_samples(flipped_latents_dir / "val-000000.tar")
    assert json.loads(samples[0]["json"])["flipped"] is True
    unflipped = _raw_samples(latents_dir / "val-000000.tar")[1:]
    with torch.no_grad():
        posterior = autoencoder.encode(batch["image"].flip(-1))  # the image pipeline's random_flip, then the VAE
    stored = torch.from_numpy(np.stack([_npy(s["mean_flipped.npy"]) for s in samples[1:]]))
    assert torch.equal(stored, posterior.mean)
    assert all(s["mean.npy"] == u["mean.npy"] for s, u in zip(samples[1:], unflipped))  # the image's own: unchanged
    assert not torch.allclose(stored, stored.flip(-1))  # (not a flipped latent: the VAE is not mirror-symmetric)


def test_random_flip_on_latents_needs_flipped_shards(latents_dir):
    datamodule = LatentShardDataModule(
        shards=str(latents_dir / "train-*.tar"), image_size=SIZE, random_flip=True, num_workers=0
    )
    with pytest.raises(UserError, match="flips=true"):
        datamodule.setup("fit")


@pytest.mark.slow
def test_training_on_latents_resumes_bit_identically_deep_into_an_epoch(model_overrides, flipped_latents_dir, tmp_path):
    """10-batch epochs (40 samples, 2 workers x batch 4), stopped at step 7, resumed to step 12."""
    from train import train

    def run(out, *extra):
        cfg = _train_config(
            model_overrides,
            flipped_latents_dir,
            out,
            "data.random_flip=true",
            "data.num_workers=2",
            "data.samples_per_epoch=40",
            "trainer.max_steps=12",
            "callbacks.checkpoint.every_n_train_steps=7",
            *extra,
        )
        return train(cfg)["task"]

    straight = run(tmp_path / "straight")
    checkpoint = tmp_path / "straight" / "run" / "checkpoints" / "step_0000007.ckpt"
    resumed = run(tmp_path / "resumed", f"resume={checkpoint}")
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
