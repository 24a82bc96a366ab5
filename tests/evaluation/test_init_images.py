"""Input images and masks of image-to-image / inpainting jobs are hostile files: listed, capped, one-line errors."""

import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import UserError
from ldm.evaluation import init_images
from ldm.evaluation.init_images import InitImageJob, list_images, list_masks, load_batch, refs_digest


def _png(path, size=(32, 32), colour=(200, 40, 40), mode="RGB"):
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path)
    return path


def _png_header_only(width, height):
    """A PNG that declares width x height pixels and carries none (a decompression bomb's header)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _png_bytes(size=(32, 32), colour=(10, 200, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_folder_lists_its_image_files_by_name_and_nothing_else(tmp_path):
    for name in ("b.png", "a.jpg", "c.webp"):
        _png(tmp_path / name) if name.endswith("png") else Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [r.name for r in list_images(str(tmp_path))] == ["a.jpg", "b.png", "c.webp"]
    assert [r.name for r in list_images(str(tmp_path / "b.png"))] == ["b.png"]  # one image
    with pytest.raises(UserError, match="no image files"):
        list_images(str(tmp_path / "sub.png"))
    with pytest.raises(UserError, match="no such folder"):
        list_images(str(tmp_path / "missing"))


def test_shards_give_one_image_per_sample_read_by_offset(tmp_path):
    red, green = _png_bytes(colour=(200, 0, 0)), _png_bytes(colour=(0, 200, 0))
    shard = _tar(
        tmp_path / "inputs-000000.tar",
        [("s/0001.png", red), ("s/0001.txt", b"a caption"), ("s/0002.jpg", green), ("s/0002.mask.png", red)],
    )
    refs = list_images(str(shard))
    assert [(r.name, r.key) for r in refs] == [
        ("inputs-000000.tar/s/0001.png", "0001"),
        ("inputs-000000.tar/s/0002.jpg", "0002"),
    ]
    assert refs[0].read() == red and refs[1].read() == green
    images, masks = load_batch(refs, None, 16, 16)
    assert images.shape == (2, 3, 16, 16) and masks is None
    assert images[0, 0].min() > 0.75 and images[1, 1].min() > 0.75  # red, then green
    (tmp_path / "bad.tar").write_bytes(b"\0" * 100 + b"not a tar" * 200)
    with pytest.raises(UserError, match="bad.tar: not a readable uncompressed tar"):
        list_images(str(tmp_path / "bad.tar"))
    import gzip

    (tmp_path / "zipped.tar").write_bytes(gzip.compress(shard.read_bytes()))  # offsets into it would be wrong
    with pytest.raises(UserError, match="zipped.tar: not a readable uncompressed tar"):
        list_images(str(tmp_path / "zipped.tar"))


def test_masks_match_their_images_by_stem_or_one_file_serves_all(tmp_path):
    images_dir, masks_dir = tmp_path / "images", tmp_path / "masks"
    images_dir.mkdir(), masks_dir.mkdir()
    for name in ("cat.jpg", "dog.png"):
        _png(images_dir / name)
    _png(masks_dir / "cat.png", mode="L"), _png(masks_dir / "dog.png", mode="L")
    images = list_images(str(images_dir))
    assert [m.name for m in list_masks(str(masks_dir), images)] == ["cat.png", "dog.png"]
    one = _png(tmp_path / "one.png", mode="L")
    assert [m.name for m in list_masks(str(one), images)] == ["one.png", "one.png"]
    (masks_dir / "dog.png").unlink()
    with pytest.raises(UserError, match=r"no mask for dog.png \(a mask is named like its image: dog.png\)"):
        list_masks(str(masks_dir), images)
    _png(masks_dir / "dog.png", mode="L"), _png(masks_dir / "dog.jpg", mode="L")
    with pytest.raises(UserError, match=r"2 masks \(dog.jpg, dog.png\) for dog.png"):
        list_masks(str(masks_dir), images)


def test_a_mask_is_resized_with_its_image_and_must_have_its_size(tmp_path):
    (tmp_path / "images").mkdir()
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 20:] = 255
    Image.fromarray(image).save(tmp_path / "images" / "wide.png")
    mask = np.zeros((20, 40), np.uint8)
    mask[:, 20:] = 255  # the right half: where the image is white
    Image.fromarray(mask).save(tmp_path / "mask.png")
    images = list_images(str(tmp_path / "images"))
    masks = list_masks(str(tmp_path / "mask.png"), images)
    pixels, masks_out = load_batch(images, masks, 16, 16)  # a 20x40 image covers 16x16 at 16x32, centre crop
    assert masks_out.shape == (1, 1, 16, 16)
    torch.testing.assert_close(masks_out[0, 0], pixels[0, 0], atol=0.02, rtol=0)  # the same geometry
    Image.fromarray(mask[:, :30]).save(tmp_path / "mask.png")
    with pytest.raises(
        UserError, match=r"mask mask.png is 30x20 but wide.png is 40x20: a mask must have its image's size"
    ):
        load_batch(images, list_masks(str(tmp_path / "mask.png"), images), 16, 16)


def test_bombs_huge_files_and_broken_images_are_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "big.png").write_bytes(_png_header_only(9000, 9000))  # 81 Mpx > MAX_IMAGE_PIXELS, < PIL's limit
    refs = {r.name: r for r in list_images(str(tmp_path))}
    for name, message in (
        ("bomb.png", "too_many_pixels"),
        ("big.png", "too_many_pixels: 9000x9000 > 67108864 pixels"),
        ("broken.png", "corrupt_image"),
    ):
        with pytest.raises(UserError, match=rf"^{name}: not a usable image \({message}"):
            load_batch([refs[name]], None, 16, 16)
    monkeypatch.setattr(init_images, "MAX_IMAGE_BYTES", 40)  # refused before a byte is read
    with pytest.raises(UserError, match=r"^bomb.png: \d+ bytes, more than the 40 an input may have"):
        refs["bomb.png"].read()


def test_the_digest_follows_content_and_names(tmp_path):
    _png(tmp_path / "a.png")
    before = refs_digest(list_images(str(tmp_path)))
    assert refs_digest(list_images(str(tmp_path))) == before
    _png(tmp_path / "a.png", colour=(1, 2, 3))
    assert refs_digest(list_images(str(tmp_path))) != before


def test_prompts_pair_with_inputs_one_for_all_or_one_each(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name)
    job = InitImageJob.from_settings(str(tmp_path), None, None, 1, 1)
    assert job.strength == 0.8 and job.settings() == {"strength": 0.8}  # diffusers' image-to-image default
    assert [r["prompt"] for r in job.pair([{"prompt": "x"}], "prompt")] == ["x", "x", "x"]
    records = [{"prompt": p} for p in "uvw"]
    assert job.pair(records, "prompts_file") == records
    with pytest.raises(UserError, match=r"2 prompts for 3 init images \(prompts_file\): give one prompt for all"):
        job.pair(records[:2], "prompts_file")
    inpainting = InitImageJob.from_settings(str(tmp_path), str(tmp_path / "a.png"), None, 3, 2)  # one mask for all
    assert inpainting.strength == 1.0 and inpainting.settings()["inpaint"] == {"resample_steps": 3, "jump_length": 2}
    assert inpainting.fields(2) == {"init_image": "c.png", "mask": "a.png"}
