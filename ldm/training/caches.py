"""Caches of what the frozen encoders give, exact by construction, for data that repeats.

Both pay off only where inputs repeat (the toy's 20,000 images seen ~2 times, its 106 captions
thousands of times) and are off by default: web-scale data rarely repeats within a run.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch import Tensor, nn


class _LRU:
    """Least-recently-used store of per-item tensors, at most ``max_entries`` of them."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.entries: OrderedDict[Hashable, Tensor] = OrderedDict()

    def lookup(self, keys: list[Hashable]) -> Tensor:
        """The entries of `keys`, stacked (every key must be present); marks them recently used."""
        for key in keys:
            self.entries.move_to_end(key)
        return torch.stack([self.entries[key] for key in keys])

    def store(self, key: Hashable, value: Tensor) -> None:
        self.entries[key] = value
        self.entries.move_to_end(key)

    def evict(self) -> None:
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


class ContextCache(_LRU):
    """Text contexts of recently seen captions, so a frozen text encoder runs once per caption.

    Exact (the encoder is frozen and deterministic); worth it where captions repeat, as in the toy's
    106 captions, and a waste of memory where they rarely do (web data): off unless ``max_entries``.
    """

    def __call__(self, encoder: nn.Module, captions: list[str]) -> Tensor:
        if self.max_entries <= 0:
            return encoder(captions)
        for caption in dict.fromkeys(c for c in captions if c not in self.entries):
            # one caption at a time: a batched matmul's last bits depend on the batch it is in, and a
            # cached context must not depend on which batch first met its caption (exact resume)
            self.store(caption, encoder([caption])[0])
        contexts = self.lookup(captions)
        self.evict()
        return contexts


def image_digest(image: Tensor) -> bytes:
    """A 16-byte content hash of one image tensor's values (and dtype and shape)."""
    array = image.detach().cpu().contiguous().numpy()
    header = f"{array.dtype}{array.shape}".encode()
    return hashlib.blake2b(header + array.tobytes(), digest_size=16).digest()


class PosteriorCache(_LRU):
    """The frozen VAE's posterior moments of recently seen images, so an image is encoded once a run.

    Keyed by the image's pixels, so an augmented (cropped, flipped) image is simply a new entry.
    Exact: the cache holds q(z|x)'s moments, not a latent, so each step still draws a fresh z from
    them with the same random numbers as without the cache; and the images a batch has not seen are
    encoded in a batch of even size (the last one twice if need be), because on CPUs oneDNN gives an
    image the same bits in every even-sized batch but not in odd ones (channels_last, or a batch of
    one), and cached moments must not depend on the batch that first met the image (exact resume).
    On a GPU each batch is copied to the host to be hashed and the moments stay on the GPU; the cache
    is meant for CPUs, where the encoder is a large share of a step. ~8 KB an image for the toy's
    4x16x16 latents.
    """

    def __call__(self, encode_moments: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
        """(B, 2C, h, w) posterior moments of `images` (B, 3, H, W); only unseen images are encoded."""
        if self.max_entries <= 0:
            return encode_moments(images)
        keys = [image_digest(image) for image in images.detach().cpu()]  # one copy to the host, not B
        unseen: dict[bytes, int] = {}  # key -> its first row in the batch
        for row, key in enumerate(keys):
            if key not in self.entries:
                unseen.setdefault(key, row)
        if unseen:
            rows = list(unseen.values())
            rows += rows[-1:] * (len(rows) % 2)
            for key, value in zip(unseen, encode_moments(images[rows])):
                self.store(key, value.clone())  # a clone: a view would keep the whole batch alive
        moments = self.lookup(keys)
        self.evict()
        return moments
