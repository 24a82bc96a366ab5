"""What a run writes and deletes: restored callback state stays inside the run, NaN weights are never saved."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from ldm.checkpoints import load_training_checkpoint
from ldm.cli import one_line_errors
from train import train


def test_resume_of_a_foreign_checkpoint_deletes_nothing_outside_the_run(
    train_config, tiny_checkpoint, tmp_path, capsys
):
    # saves at steps 4 and 6 (every 2, as the tiny checkpoint's callback: the state key must match)
    cfg = train_config("~callbacks.sample_grid", "trainer.max_steps=6", "callbacks.checkpoint.save_top_k=2")
    dirpath = str(Path(cfg.paths.output_dir) / "checkpoints")
    victim_dir, victim_file = tmp_path / "victim", tmp_path / "victim.txt"
    (victim_dir / "data").mkdir(parents=True)
    victim_file.write_text("precious")
    escape = f"{dirpath}/../.."  # == tmp_path, but starts with the run's checkpoint directory
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    key = next(k for k in checkpoint["callbacks"] if k.startswith("ModelCheckpoint{'monitor': 'step'"))
    checkpoint["callbacks"][key].update(
        dirpath=dirpath,  # as if written by this very run, so Lightning restores everything
        best_k_models={f"{escape}/victim": torch.tensor(-1.0), f"{escape}/victim.txt": torch.tensor(-2.0)},
        kth_best_model_path=f"{escape}/victim.txt",
        kth_value=torch.tensor(-2.0),
        best_model_path=f"{escape}/victim",
        last_model_path=f"{escape}/victim",
    )
    foreign = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, foreign)

    cfg.resume = str(foreign)
    assert train(cfg)["trainer"].global_step == 6
    assert victim_file.read_text() == "precious" and (victim_dir / "data").is_dir()
    assert "ignoring the checkpoint callback state of the resumed checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in Path(dirpath).iterdir()) == ["last.ckpt", "step_0000004.ckpt", "step_0000006.ckpt"]


def test_checkpoint_state_inside_the_run_is_restored(tmp_path):
    from ldm.training.callbacks import RunCheckpoint

    callback = RunCheckpoint(dirpath=str(tmp_path / "checkpoints"), monitor="step", mode="max", save_top_k=2)
    assert callback.state_key.startswith("ModelCheckpoint{")  # checkpoints of older runs keep restoring
    inside = str(tmp_path / "checkpoints" / "step_0000002.ckpt")
    callback.load_state_dict(
        {
            "dirpath": callback.dirpath,
            "best_model_score": torch.tensor(2.0),
            "best_model_path": inside,
            "best_k_models": {inside: torch.tensor(2.0)},
            "kth_best_model_path": inside,
            "last_model_path": "",
        }
    )
    assert callback.best_k_models == {inside: torch.tensor(2.0)} and callback.kth_best_model_path == inside


class PoisonWeights(pl.Callback):
    """Makes one U-Net weight NaN after optimiser step ``step``, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.unet.parameters()).view(-1)[0] = float("nan")


def test_nan_weights_are_never_saved_and_the_run_stops(train_config, capsys):
    cfg = train_config(
        "~callbacks.sample_grid",
        "trainer.max_steps=20",
        "trainer.val_check_interval=1000",
        "callbacks.checkpoint.every_n_train_steps=1",
        "callbacks.checkpoint.save_top_k=2",
        "+callbacks.poison._target_=test_checkpoint_safety.PoisonWeights",
        "+callbacks.poison.step=3",
    )
    with pytest.raises(SystemExit), one_line_errors():
        train(cfg)
    stderr = capsys.readouterr().err
    assert stderr.count("holds NaN/Inf: not saving") == 1  # warned once, for the first refused save
    assert "warning: step 3: unet." in stderr
    assert "error: the weights became NaN/Inf by step 3" in stderr
    directory = Path(cfg.paths.output_dir) / "checkpoints"
    # the last good files, none deleted for a refused one, and the run stopped at the next step
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt", "step_0000001.ckpt", "step_0000002.ckpt"]
    for path in directory.iterdir():
        state = load_training_checkpoint(path)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert load_training_checkpoint(directory / "last.ckpt")["global_step"] == 2


def test_the_finiteness_check_flags_nan_and_inf_and_nothing_finite():
    from ldm.training.checkpoint_io import first_nonfinite

    huge = {
        "fp32": torch.full((1000,), 3.0e38),
        "fp16": torch.full((10,), 65504.0, dtype=torch.float16),
        "steps": torch.arange(3),
    }  # a float64 sum of finite weights cannot overflow
    assert first_nonfinite(huge) is None
    for value in (float("nan"), float("inf"), -float("inf")):
        broken = torch.ones(5, dtype=torch.bfloat16)
        broken[2] = value
        assert first_nonfinite({**huge, "ema.module.w": broken}) == "ema.module.w"
