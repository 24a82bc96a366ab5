"""The one shard writer (ldm.data.shard_writer): webdataset's own writer and reader agree with it,
shards are published whole or not at all."""

import io
import os
from pathlib import Path

import pytest
import webdataset as wds

from ldm.data.shard_writer import TAR_MTIME, ShardSequenceWriter, ShardWriter

SAMPLES = [
    {"__key__": "000000", "png": b"\x89PNG fake", "txt": "a caf\u00e9", "json": '{"width": 2}'},
    {"__key__": "__meta__", "json": "{}", "empty_context.npy": b"\x93NUMPY"},
    {"__key__": "d/" + "long" * 40, "txt": "a name over 100 characters needs a pax header", "__url__": "skipped"},
]


def test_bytes_equal_webdatasets_tar_writer(tmp_path: Path) -> None:
    reference = io.BytesIO()
    with wds.TarWriter(reference, mtime=TAR_MTIME) as writer:  # closing it would close our BytesIO
        for sample in SAMPLES:
            writer.write({k: v for k, v in sample.items() if k != "__url__"})
        writer.tarstream.close()
        expected = reference.getvalue()
    shard = ShardWriter(tmp_path / "a.tar")
    for sample in SAMPLES:
        shard.write(sample)
    assert shard.close() == tmp_path / "a.tar" and shard.num_samples == 3
    assert (tmp_path / "a.tar").read_bytes() == expected
    read = list(wds.DataPipeline(wds.SimpleShardList([str(tmp_path / "a.tar")]), wds.tarfile_to_samples()))
    assert [s["__key__"] for s in read] == [s["__key__"] for s in SAMPLES]
    assert read[0]["txt"] == "a caf\u00e9".encode() and "__url__" not in (tmp_path / "a.tar").read_bytes().decode(
        "latin1"
    )


def test_a_member_that_is_not_bytes_or_str_is_refused(tmp_path: Path) -> None:
    shard = ShardWriter(tmp_path / "a.tar")
    with pytest.raises(TypeError, match="member cls is a int"):
        shard.write({"__key__": "k", "cls": 3})
    shard.abort()
    assert os.listdir(tmp_path) == []


def test_sequence_splits_publishes_and_aborts_only_the_open_shard(tmp_path: Path) -> None:
    with ShardSequenceWriter(tmp_path, "train", samples_per_shard=2) as writer:
        pass
    assert writer.shards == [] and os.listdir(tmp_path) == []  # no samples: no shard
    with pytest.raises(KeyboardInterrupt), ShardSequenceWriter(tmp_path, "train", samples_per_shard=2) as writer:
        for index in range(5):
            if index == 3:
                raise KeyboardInterrupt
            writer.write({"__key__": f"{index:06d}", "txt": "x"})
    assert [(s.name, s.num_samples) for s in writer.shards] == [("train-000000.tar", 2)]
    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar"]  # the open shard's temporary file is gone
    assert writer.shards[0].num_bytes == (tmp_path / "train-000000.tar").stat().st_size
