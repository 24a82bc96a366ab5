"""Hand-written shards for the data tests: good samples and every kind of bad one, written with tarfile."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(size: tuple[int, int] = (12, 10), colour=(200, 30, 30), fmt: str = "PNG") -> bytes:
    """A flat RGB image of ``size`` (w, h) encoded as ``fmt``."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but carries no pixel data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar holding ``members`` (name, data) in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def good_sample(key: str, caption: str | None = None, meta: dict | None = None, size=(12, 10)) -> list:
    """The members of one good sample: .png, .txt (caption defaults to 'caption <key>'), optional .json."""
    colour = tuple(int(c) for c in np.random.default_rng(zlib.crc32(key.encode())).integers(0, 256, 3))
    members = [(f"{key}.png", image_bytes(size, colour)), (f"{key}.txt", (caption or f"caption {key}").encode())]
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


def member_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """Member name -> (offset of its header, offset of its data) in the tar ``data``."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    path.write_bytes(tar_bytes(members))
    return str(path)


def write_good_shard(path: Path, keys: list[str], size=(12, 10)) -> str:
    """A shard of good samples with the given (globally unique) keys."""
    return write_tar(path, [m for key in keys for m in good_sample(key, size=size)])


def bad_corpus(directory: Path) -> tuple[list[str], set[str], dict[str, int]]:
    """Shards holding every kind of bad sample, in a fixed order.

    Returns (urls, keys of the good samples, the exact counts the pipeline must report), for a
    pipeline with max_pixels=1_000_000, filters max_unsafe=0.5, empty_captions=drop, read_timeout 0.5 s.
    """
    directory.mkdir(parents=True, exist_ok=True)
    good: set[str] = set()

    # shard 0: good samples only
    keys = [f"a{i:03d}" for i in range(5)]
    shard0 = write_good_shard(directory / "a.tar", keys)
    good.update(keys)

    # shard 1: bad samples between good ones
    members = [
        *good_sample("b000"),
        ("b001.png", b"this is not an image at all"),
        ("b001.txt", b"corrupt bytes"),
        ("b002.png", b""),
        ("b002.txt", b"zero-byte image"),
        ("b003.txt", b"caption but no image"),
        ("b003.json", b"{}"),
        ("b004.png", png_header_only(50_000, 50_000)),
        ("b004.txt", b"2.5 gigapixels declared"),
        ("b005.png", image_bytes()[:40]),
        ("b005.txt", b"truncated image data"),
        *good_sample("b006"),
        ("b007.png", image_bytes()),
        ("b007.txt", b"   \n  "),  # empty caption
        ("b008.png", image_bytes()),
        ("b008.txt", b"flagged"),
        ("b008.json", json.dumps({"punsafe": 0.9}).encode()),
        ("b009.png", image_bytes()),
        ("b009.txt", b"bad json"),
        ("b009.json", b"{not json"),
        *good_sample("b010", meta={"punsafe": 0.1}),
        ("__meta__", b"ignored"),
        *good_sample("b011"),
        ("b012.png", png_header_only(2000, 1000)),
        ("b012.txt", b"2 megapixels declared, limit 1"),
    ]
    shard1 = write_tar(directory / "b.tar", members)
    good.update({"b000", "b006", "b010", "b011"})

    # shard 2: cut in the middle of the 4th sample's image data: the first 3 survive
    keys = [f"c{i:03d}" for i in range(6)]
    full = tar_bytes([m for key in keys for m in good_sample(key)])
    (directory / "c.tar").write_bytes(full[: member_offsets(full)["c003.png"][1] + 20])
    shard2 = str(directory / "c.tar")
    good.update(keys[:3])

    # shard 3: cut exactly before a member's header, where tarfile alone sees a clean end
    keys = [f"d{i:03d}" for i in range(3)]
    full = tar_bytes([m for key in keys for m in good_sample(key)])
    (directory / "d.tar").write_bytes(full[: member_offsets(full)["d002.png"][0]])
    shard3 = str(directory / "d.tar")
    good.update(keys[:1])  # d001 was the sample in progress when the data ended: dropped

    # shard 4: cut inside a header (tarfile alone: a clean end again)
    keys = [f"f{i:03d}" for i in range(3)]
    full = tar_bytes([m for key in keys for m in good_sample(key)])
    (directory / "f.tar").write_bytes(full[: member_offsets(full)["f002.png"][0] + 100])
    shard4 = str(directory / "f.tar")
    good.update(keys[:1])

    # shards that cannot be read at all
    (directory / "garbage.tar").write_bytes(b"definitely not a tar archive" * 40)
    (directory / "empty.tar").write_bytes(b"")
    missing = str(directory / "missing.tar")
    failing_pipe = f"pipe:cat {directory / 'no-such-file.tar'} 2>/dev/null"
    stalled_pipe = "pipe:sleep 3"

    # a good shard streamed through a command
    keys = [f"e{i:03d}" for i in range(2)]
    write_good_shard(directory / "e.tar", keys)
    good_pipe = f"pipe:cat {directory / 'e.tar'}"
    good.update(keys)

    urls = [
        shard0,
        shard1,
        shard2,
        shard3,
        shard4,
        str(directory / "garbage.tar"),
        str(directory / "empty.tar"),
        missing,
        failing_pipe,
        stalled_pipe,
        good_pipe,
    ]
    counts = {
        "skipped/corrupt_image": 2,  # b001 (garbage), b005 (truncated data)
        "skipped/empty_image": 1,  # b002
        "skipped/no_image": 1,  # b003
        "skipped/too_many_pixels": 2,  # b004 (over PIL's own limit too), b012
        "skipped/empty_caption": 1,  # b007
        "filtered/max_unsafe": 1,  # b008
        "skipped/corrupt_metadata": 1,  # b009
        "skipped/truncated_shard": 3,  # c.tar, d.tar, f.tar
        "skipped/unreadable_shard": 4,  # garbage.tar, empty.tar, missing.tar, the failing pipe
        "skipped/stalled_shard": 1,  # the sleeping pipe
    }
    return urls, good, counts
