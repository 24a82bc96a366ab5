"""A run directory is someone's work: refusals, resume=auto's choice, temp files, resume= errors."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train as train_module
from ldm.checkpoints import load_training_checkpoint
from ldm.cli import one_line_errors
from train import resume_path, train


def _one_line_error(capsys, function, *args) -> str:
    with pytest.raises(SystemExit) as exit_info, one_line_errors():  # what main() wraps train() in
        function(*args)
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr  # warnings may precede it, one line each
    return errors[0]


def _checkpoint_dir(cfg) -> Path:
    directory = Path(cfg.paths.output_dir) / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def test_a_fresh_run_refuses_a_directory_with_checkpoints(train_config, capsys):
    cfg = train_config()
    last = _checkpoint_dir(cfg) / "last.ckpt"
    last.write_bytes(b"another run's work")
    error = _one_line_error(capsys, train, cfg)
    assert error.startswith(f"error: {last.parent} already holds checkpoints (last.ckpt)")
    assert "resume=auto" in error and "overwrite=true" in error
    assert last.read_bytes() == b"another run's work"
    assert resume_path(train_config("overwrite=true")) is None and not last.exists()  # said and done


def test_resume_auto_says_it_starts_fresh(train_config, capsys):
    cfg = train_config("resume=auto")
    assert resume_path(cfg) is None
    assert f"resume=auto: no checkpoint in {Path(cfg.paths.output_dir) / 'checkpoints'}, starting fresh" in (
        capsys.readouterr().out
    )


def test_resume_auto_skips_a_corrupt_last_and_removes_killed_saves(train_config, tiny_checkpoint, capsys):
    cfg = train_config("resume=auto")
    directory = _checkpoint_dir(cfg)
    intact = directory / "step_0000002.ckpt"
    shutil.copy(tiny_checkpoint, intact)
    (directory / "last.ckpt").write_bytes(tiny_checkpoint.read_bytes()[:5000])  # a torn copy
    killed = directory / ".last.ckpt.k2x_9abc.tmp"  # ldm.atomic's temporary name for last.ckpt
    killed.write_bytes(b"\0" * 1000)
    others = [directory / "notes.tmp", directory / ".hidden.tmp", directory.parent / ".last.ckpt.abcd1234.tmp"]
    for other in others:
        other.write_bytes(b"not ours")

    assert resume_path(cfg) == str(intact)
    captured = capsys.readouterr()
    assert not killed.exists() and all(p.exists() for p in others)
    assert f"warning: removed {killed}" in captured.err
    assert f"warning: resume=auto: skipping {directory / 'last.ckpt'}: unreadable (" in captured.err
    assert f"resume=auto: resuming step 2 from {intact}" in captured.out


def test_resume_auto_refuses_when_no_checkpoint_reads(train_config, capsys):
    cfg = train_config("resume=auto")
    (_checkpoint_dir(cfg) / "last.ckpt").write_bytes(b"garbage")
    error = _one_line_error(capsys, resume_path, cfg)
    assert "none of the 1 checkpoints" in error and "(last.ckpt)" in error


def test_resume_of_a_directory_is_one_line(train_config, tmp_path, capsys):
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    error = _one_line_error(capsys, resume_path, train_config(f"resume={run}"))
    assert error.startswith(f"error: resume={run} is a directory")
    assert f"resume={run / 'checkpoints' / 'last.ckpt'}" in error and "resume=auto" in error


def test_resume_of_a_corrupt_file_is_one_line(train_config, tiny_checkpoint, tmp_path, capsys):
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    error = _one_line_error(capsys, resume_path, train_config(f"resume={torn}"))
    assert error.startswith(f"error: cannot resume from {torn}: unreadable (")


class _Payload:
    """Unpickling this writes a marker file: the test fails if it ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_resume_of_a_pickle_file_is_one_line_and_never_unpickled(train_config, tiny_checkpoint, tmp_path, capsys):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    marker = tmp_path / "marker"
    checkpoint["payload"] = _Payload(marker)
    hostile = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, hostile)
    error = _one_line_error(capsys, train, train_config(f"resume={hostile}"))
    assert error == f"error: cannot resume from {hostile}: it holds pickled Python objects, which are never loaded"
    assert not marker.exists()


def test_resume_auto_loads_pretrained_weights_on_the_first_launch(train_config, monkeypatch, tmp_path):
    # resume=auto is the requeue-safe command: the first launch must fine-tune the pretrained model,
    # not a random one; a relaunch resumes (and loads the file again: frozen parts come from it)
    loaded = []

    def fake_load_weights_into(unet, autoencoder, conditioner, path):
        loaded.append(str(path))
        with torch.no_grad():
            for p in unet.parameters():
                p.fill_(0.01)
        return SimpleNamespace(prediction_type="x0")  # the bundle load_weights_into returns

    monkeypatch.setattr(train_module, "load_weights_into", fake_load_weights_into)
    overrides = (
        "~callbacks.sample_grid",
        f"+model.pretrained={tmp_path / 'sd.safetensors'}",
        "resume=auto",
        "optim.optimizer.lr=0",
        "callbacks.checkpoint.every_n_train_steps=1000",
    )
    first = train(train_config(*overrides, "trainer.max_steps=2"))
    assert loaded == [str(tmp_path / "sd.safetensors")]
    assert all(torch.all(p == 0.01) for p in first["task"].unet.parameters())  # lr 0: still the file's weights

    second = train(train_config(*overrides, "trainer.max_steps=3"))
    assert second["trainer"].global_step == 3 and len(loaded) == 2
    last = load_training_checkpoint(Path(first["output_dir"]) / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3
