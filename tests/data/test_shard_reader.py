"""Reading one shard: local files, commands and object-storage URLs, compressed tars, odd endings."""

import gzip
import io
import os
import stat
import tarfile
import tracemalloc

import pytest
from shard_corpus import good_sample, tar_bytes, write_good_shard

from ldm.data.shard_reader import read_shard, split_name
from ldm.data.skips import DataCounts


def _read(url, **options):
    counts = DataCounts()
    keys = [sample["__key__"] for sample in read_shard(url, counts, **options)]
    return keys, counts.take()


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    """`aws`, `gsutil` and `curl` on PATH that print the local file named by the URL's last part."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("aws", "gsutil", "curl"):
        script = bin_dir / tool
        # every tool gets the URL among its arguments; serve tmp_path/<basename of the URL>
        serve = f'for a in "$@"; do case "$a" in *://*) exec cat "{tmp_path}/${{a##*/}}";; esac; done'
        script.write_text(f"#!/bin/sh\n{serve}\nexit 3\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


@pytest.mark.parametrize(
    "url", ["s3://bucket/dir/remote.tar", "gs://bucket/remote.tar", "https://host/remote.tar", "http://host/remote.tar"]
)
def test_object_storage_urls_are_read_through_their_tools(fake_tools, url):
    write_good_shard(fake_tools / "remote.tar", ["r0", "r1"])
    assert _read(url) == (["r0", "r1"], {})


def test_a_missing_remote_object_is_an_unreadable_shard(fake_tools):
    assert _read("s3://bucket/absent.tar") == ([], {"skipped/unreadable_shard": 1})


def test_compressed_tars_and_file_urls(tmp_path):
    (tmp_path / "z.tar.gz").write_bytes(gzip.compress(tar_bytes(good_sample("z0") + good_sample("z1"))))
    assert _read(str(tmp_path / "z.tar.gz")) == (["z0", "z1"], {})
    write_good_shard(tmp_path / "f.tar", ["f0"])
    assert _read(f"file://{tmp_path}/f.tar") == (["f0"], {})


def test_an_empty_tar_is_not_an_error(tmp_path):
    (tmp_path / "e.tar").write_bytes(tar_bytes([]))
    assert _read(str(tmp_path / "e.tar")) == ([], {})


def test_a_command_failing_after_its_output_drops_the_last_sample(tmp_path):
    shard = write_good_shard(tmp_path / "s.tar", ["s0", "s1", "s2"])
    assert _read(f"pipe:cat {shard}; exit 2") == (["s0", "s1"], {"skipped/truncated_shard": 1})
    assert _read(f"pipe:cat {shard} | cat") == (["s0", "s1", "s2"], {})  # a shell pipeline


def test_member_names_split_like_webdataset():
    assert split_name("dir/000123.jpg") == ("dir/000123", "jpg")
    assert split_name("000123.seg.PNG") == ("000123", "seg.png")
    assert split_name("noextension") == (None, None)


def _sparse_member(name: str, declared: int) -> tarfile.TarInfo:
    """A GNU sparse member (PAX 0.1) storing 10 bytes but declaring ``declared`` bytes of content."""
    info = tarfile.TarInfo(name)
    info.size = 10
    info.pax_headers = {"GNU.sparse.map": "0,10", "GNU.sparse.size": str(declared)}
    return info


def test_a_member_declaring_more_than_the_cap_is_never_read(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in good_sample("g0"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(_sparse_member("bomb.png", 256 << 20), io.BytesIO(b"x" * 10))  # 256 MiB from 10 bytes
        tar.addfile(tarfile.TarInfo("bomb.txt"), io.BytesIO(b""))
        for name, data in good_sample("g1"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard = tmp_path / "sparse.tar"
    shard.write_bytes(buffer.getvalue())
    assert shard.stat().st_size < 20_000

    tracemalloc.start()
    try:
        keys, counts = _read(str(shard))  # the default cap (64 MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert keys == ["g0", "g1"] and counts == {"skipped/oversized_member": 1}
    assert peak < 8 << 20  # the 256 MiB member was never expanded
    assert _read(str(shard), max_member_bytes=20)[1] == {"skipped/oversized_member": 3}  # every png is over 20 B
    assert len(_read(str(shard), max_member_bytes=None)[0]) == 3  # no cap: read (as before)


def test_a_local_read_that_never_returns_is_a_stalled_shard(tmp_path):
    fifo = tmp_path / "hung.tar"
    os.mkfifo(fifo)  # opening it blocks until a writer comes, as a read on a dead NFS server would
    counts = DataCounts()
    try:
        assert list(read_shard(str(fifo), counts, read_timeout=0.3)) == []
        assert counts.take() == {"skipped/stalled_shard": 1}
        reason, where, detail = counts.last_skip
        assert where == str(fifo) and "no data for 0.3 s from" in detail and str(fifo) in detail
    finally:  # let the abandoned reader thread finish
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_local_reads_with_a_timeout_give_the_same_samples(tmp_path):
    keys = [f"s{i:03d}" for i in range(40)]
    shard = write_good_shard(tmp_path / "s.tar", keys)
    assert _read(shard, read_timeout=5.0) == (keys, {})
    assert _read(shard, read_timeout=None) == (keys, {})


def test_a_shard_reopens_at_a_sample_by_count_or_by_offset_and_single_samples_read_at_their_offsets(tmp_path):
    from ldm.data.shard_reader import read_samples_at

    keys = [f"k{i:02d}" for i in range(7)]
    members = [m for key in keys for m in good_sample(key)]
    members.insert(4, ("k01.json", b"{}"))  # (samples of 2 and 3 members)
    url = str(tmp_path / "plain.tar")
    (tmp_path / "plain.tar").write_bytes(tar_bytes(members))
    whole = list(read_shard(url, DataCounts()))
    assert [s["__key__"] for s in whole] == keys and whole[0]["__offset__"] == 0
    assert all(a["__end__"] == b["__offset__"] for a, b in zip(whole, whole[1:]))
    for start in (1, 3, 6, 7):
        by_count = list(read_shard(url, DataCounts(), skip=start))
        offset = whole[start - 1]["__end__"]
        counts = DataCounts()
        by_offset = list(read_shard(url, counts, offset=offset))
        assert by_count == by_offset == whole[start:] and counts.take() == {}  # (the end: nothing, no error)
    wanted = [whole[5]["__offset__"], whole[1]["__offset__"], whole[6]["__offset__"], 12345]
    found = read_samples_at(url, wanted)
    assert found == {whole[i]["__offset__"]: whole[i] for i in (1, 5, 6)}  # an offset that is no sample: left out
    # a compressed shard or a command carries no offsets: a resume counts samples there
    with gzip.open(tmp_path / "packed.tar.gz", "wb") as packed:
        packed.write(tar_bytes(members))
    for other in (str(tmp_path / "packed.tar.gz"), f"pipe:cat {url}"):
        assert all("__offset__" not in s for s in read_shard(other, DataCounts()))
