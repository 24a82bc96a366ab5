"""ldm.atomic: a file appears whole or not at all, and a killed write leaves a name cleanups recognise."""

import os
import stat

import pytest

from ldm import atomic


def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "metadata.jsonl"
    atomic.write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target, "w") as file:
            file.write("half of the new")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["metadata.jsonl"]
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as temp:
        temp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["metadata.jsonl"]


def test_a_finished_write_replaces_the_file_with_the_usual_mode(tmp_path):
    target = tmp_path / "sub" / "model.safetensors"
    with atomic.atomic_path(target) as temp:
        assert temp.parent == target.parent and atomic.temporary_target(temp.name) == "model.safetensors"
        temp.write_bytes(b"weights")
    atomic.write_bytes(tmp_path / "b.bin", b"\0\1")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_bytes() == b"weights" and (tmp_path / "b.bin").read_bytes() == b"\0\1"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    assert os.listdir(target.parent) == ["model.safetensors"]


def test_temporary_names_are_told_from_other_files():
    assert atomic.temporary_target(".last.ckpt.k2x_9abc.tmp") == "last.ckpt"
    assert atomic.temporary_target(".000012.png.a1b2c3d4.tmp") == "000012.png"
    for name in ("last.ckpt", "notes.tmp", ".hidden.tmp", ".last.ckpt.tmp"):
        assert atomic.temporary_target(name) is None


def test_atomic_open_refuses_modes_that_read_or_append(tmp_path):
    for mode in ("r", "a", "w+", "rb"):
        with pytest.raises(ValueError, match="writes new files"):
            with atomic.atomic_open(tmp_path / "x", mode):
                pass
