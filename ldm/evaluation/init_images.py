"""The input images (and masks) of image-to-image and inpainting jobs: listed, fingerprinted, read per batch.

``init_images`` is an image file, a folder (its image files, by name; not recursive) or webdataset
shards (each sample's image member, in shard order). ``masks`` is one image file for every input, or a folder with
one mask per input, matched by name stem (``cat.jpg`` <- ``cat.png``; for shards the sample key's last
part). A mask is white (>= 50% grey) where the image is repainted and black where it is kept, and has
its image's size.

The files are untrusted: each is read up to ``MAX_IMAGE_BYTES``, its header is checked against
``MAX_IMAGE_PIXELS`` before any pixel is decoded (decompression bombs), EXIF orientation is applied
(``ldm.data.decode``), and anything unreadable is a one-line error naming the file. Images are listed
by reference and read batch by batch, so a job of many inputs does not hold them in memory; only the
shard members' offsets are kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ldm.data.decode import IMAGE_EXTENSIONS, decode_image
from ldm.data.shard_reader import UnreadableShard, member_index
from ldm.data.shards import REMOTE_PREFIXES, expand_shards
from ldm.data.skips import SkipSample
from ldm.data.transforms import ImageTransform
from ldm.errors import UserError
from ldm.pipeline import ImageInputs

MAX_IMAGE_BYTES = 64 << 20  # one input file; larger ones are refused unread
MAX_IMAGE_PIXELS = 8192 * 8192  # width x height from the header; PIL's own bomb limit is 179 Mpx
MAX_IMAGES = 1_000_000  # as many inputs as a job may have prompts


@dataclass(frozen=True)
class ImageRef:
    """Where one input image lies: a file (offset 0), or a member of a tar (its data offset)."""

    name: str  # the file's name in its folder, or "<shard file name>/<member name>"
    path: Path
    size: int
    offset: int = 0
    key: str = ""  # the stem masks are matched by

    def read(self) -> bytes:
        if self.size > MAX_IMAGE_BYTES:
            raise UserError(f"{self.name}: {self.size:,} bytes, more than the {MAX_IMAGE_BYTES:,} an input may have")
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                data = file.read(self.size)
        except OSError as error:
            raise UserError(f"{self.name}: cannot read ({error.strerror or error})") from None
        if len(data) != self.size:
            raise UserError(f"{self.name}: the file changed while the job ran (read {len(data)} of {self.size} bytes)")
        return data


def _is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def list_images(spec: Any, what: str = "init_images") -> list[ImageRef]:
    """The inputs named by ``spec``: one image file, a folder's image files sorted by name, or the image
    member of every sample of the shards ``spec`` expands to (``ldm.data.shards``), in order. A one-line
    error if none."""
    if isinstance(spec, str) and Path(spec).expanduser().is_dir():
        return _folder_images(Path(spec).expanduser(), what)
    if isinstance(spec, str) and _is_image_name(spec) and Path(spec).expanduser().is_file():
        path = Path(spec).expanduser()  # one image
        return [ImageRef(path.name, path, path.stat().st_size, key=path.name.rsplit(".", 1)[0])]

    if isinstance(spec, str) and not Path(spec).expanduser().suffix == ".tar" and "{" not in spec and "*" not in spec:
        raise UserError(f"{what}={spec}: no such folder (give a folder of images or .tar shards)")
    refs: list[ImageRef] = []
    for url in expand_shards(spec):
        if url.startswith(REMOTE_PREFIXES):
            raise UserError(f"{what}: {url}: only local shards can be read by offset (copy them first)")
        refs.extend(_shard_images(Path(url), what, MAX_IMAGES - len(refs)))
    if not refs:
        raise UserError(f"{what}={spec}: the shards hold no image")
    return refs


def _folder_images(folder: Path, what: str) -> list[ImageRef]:
    refs = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not _is_image_name(path.name) or not path.is_file():
            continue
        if len(refs) >= MAX_IMAGES:
            raise UserError(f"{what}={folder}: more than {MAX_IMAGES:,} images: split them into several jobs")
        refs.append(ImageRef(path.name, path, path.stat().st_size, key=path.name.rsplit(".", 1)[0]))
    if not refs:
        raise UserError(f"{what}={folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    return refs


def _shard_images(path: Path, what: str, room: int) -> list[ImageRef]:
    """One image per sample key (the first image member), in the order of the tar."""
    refs, keys = [], set()
    try:
        for member in member_index(path):
            if not _is_image_name(member.name):
                continue
            key = member.name.split(".", 1)[0]  # webdataset: the key is the name up to its first dot
            if key in keys:
                continue
            if len(refs) >= room:
                raise UserError(f"{what}: more than {MAX_IMAGES:,} images: split them into several jobs")
            keys.add(key)
            refs.append(
                ImageRef(f"{path.name}/{member.name}", path, member.size, member.offset, key.rsplit("/", 1)[-1])
            )
    except UnreadableShard as error:
        raise UserError(f"{what}: {error}") from None
    return refs


def list_masks(spec: Any, images: Sequence[ImageRef]) -> list[ImageRef]:
    """One mask per input: the same file for all (``spec`` a file), or the file of the input's stem in
    the folder ``spec`` (any image extension; one-line errors for a missing or an ambiguous one)."""
    path = Path(str(spec)).expanduser()
    if path.is_file():
        if not _is_image_name(path.name):
            raise UserError(f"masks={spec}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        mask = ImageRef(path.name, path, path.stat().st_size, key=path.stem)
        return [mask] * len(images)
    if not path.is_dir():
        raise UserError(f"masks={spec}: no such file or folder")
    by_stem: dict[str, list[ImageRef]] = {}
    for ref in _folder_images(path, "masks"):
        by_stem.setdefault(ref.key, []).append(ref)
    masks = []
    for image in images:
        found = by_stem.get(image.key, [])
        if len(found) != 1:
            problem = "no mask" if not found else f"{len(found)} masks ({', '.join(r.name for r in found)})"
            raise UserError(
                f"masks={spec}: {problem} for {image.name} (a mask is named like its image: {image.key}.png)"
            )
        masks.append(found[0])
    return masks


def refs_digest(refs: Sequence[ImageRef]) -> str:
    """sha256 over every input's name and content, in order (what job.json compares)."""
    digest = hashlib.sha256()
    for ref in refs:
        digest.update(ref.name.encode() + b"\0" + hashlib.sha256(ref.read()).digest())
    return digest.hexdigest()


def decode(ref: ImageRef) -> Image.Image:
    """The upright RGB image of ``ref``, or a one-line error naming it."""
    try:
        return decode_image(ref.read(), max_pixels=MAX_IMAGE_PIXELS)
    except SkipSample as skip:
        raise UserError(f"{ref.name}: not a usable image ({skip})") from None


def load_batch(
    images: Sequence[ImageRef], masks: Sequence[ImageRef] | None, height: int, width: int
) -> tuple[Tensor, Tensor | None]:
    """Images (B, 3, height, width) in [0, 1] and masks (B, 1, height, width) in [0, 1] (1 = repaint) or
    None: each image resized to cover the size and centre-cropped (the training transform's geometry),
    its mask the same way (a mask must have its image's size, so that both land on the same pixels)."""
    transform = ImageTransform((width, height), center_crop=True, uint8=True)
    pixels, grey = [], []
    for index, ref in enumerate(images):
        image = decode(ref)
        pixels.append(transform(image))  # (3, height, width) uint8
        if masks is not None:
            mask = decode(masks[index])
            if mask.size != image.size:
                raise UserError(
                    f"mask {masks[index].name} is {mask.size[0]}x{mask.size[1]} but {ref.name} is "
                    f"{image.size[0]}x{image.size[1]}: a mask must have its image's size"
                )
            grey.append(transform(mask.convert("L").convert("RGB"))[:1])  # one grey level in every channel
    as_float = lambda batch: torch.stack(batch).float() / 255  # noqa: E731
    return as_float(pixels), as_float(grey) if masks is not None else None


def check_pairing(num_records: int, num_images: int, source: str) -> None:
    """Prompts pair with inputs in order: one prompt for all, or exactly one per input."""
    if num_records not in (1, num_images):
        raise UserError(
            f"{num_records} prompts for {num_images} init images ({source}): give one prompt for all of "
            "them, or one per image in the same order"
        )


IMAGE_TO_IMAGE_STRENGTH = 0.8  # strength=null: diffusers' image-to-image default
INPAINTING_STRENGTH = 1.0  # strength=null with masks: diffusers' inpainting default (the whole grid, from noise)


@dataclass(frozen=True)
class InitImageJob:
    """The inputs of an image-to-image or inpainting job: image k (and its mask) belongs to prompt record k.

    strength: the share of the sampler's grid run (``ldm.diffusion.img2img``); resample_steps and
    jump_length: RePaint's U and j (``ldm.diffusion.inpainting``), with masks only."""

    images: list[ImageRef]
    masks: list[ImageRef] | None
    strength: float
    resample_steps: int = 1
    jump_length: int = 1

    @classmethod
    def from_settings(
        cls, init_images: Any, masks: Any, strength: float | None, resample_steps: int, jump_length: int
    ) -> InitImageJob:
        images = list_images(init_images)
        mask_refs = list_masks(masks, images) if masks is not None else None
        if strength is None:
            strength = INPAINTING_STRENGTH if mask_refs is not None else IMAGE_TO_IMAGE_STRENGTH
        return cls(images, mask_refs, float(strength), resample_steps, jump_length)

    def pair(self, records: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
        """One prompt record per input: a single prompt is repeated for every image."""
        check_pairing(len(records), len(self.images), source)
        return [dict(records[0]) for _ in self.images] if len(records) == 1 else records

    def settings(self) -> dict[str, Any]:
        """What every image's metadata records (the inputs themselves: ``fields``)."""
        settings: dict[str, Any] = {"strength": self.strength}
        if self.masks is not None:
            settings["inpaint"] = {"resample_steps": self.resample_steps, "jump_length": self.jump_length}
        return settings

    def manifest(self) -> dict[str, Any]:
        """Digests of the inputs' contents for job.json (reads every input once)."""
        return {
            "init_images": refs_digest(self.images),
            "masks": None if self.masks is None else refs_digest(self.masks),
        }

    def fields(self, record: int) -> dict[str, Any]:
        """The input of prompt record ``record``, named in its images' metadata."""
        fields = {"init_image": self.images[record].name}
        if self.masks is not None:
            fields["mask"] = self.masks[record].name
        return fields

    def inputs(self, records: Sequence[int], height: int, width: int) -> ImageInputs:
        """``ImageInputs`` for a batch of items of these prompt records."""
        images, masks = load_batch(
            [self.images[r] for r in records],
            None if self.masks is None else [self.masks[r] for r in records],
            height,
            width,
        )
        return ImageInputs(images, self.strength, masks, self.resample_steps, self.jump_length)
