import pytest
import torch
from hydra.utils import instantiate

from ldm.training.caches import ContextCache, PosteriorCache, image_digest


class CountingEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoded: list[str] = []

    def forward(self, captions):
        self.encoded += captions
        return torch.stack([torch.full((3, 2), float(len(c))) for c in captions])


def test_context_cache_encodes_each_caption_once_and_evicts_the_oldest():
    encoder, cache = CountingEncoder(), ContextCache(max_entries=2)
    first = cache(encoder, ["ab", "abc", "ab"])
    assert encoder.encoded == ["ab", "abc"]
    assert torch.equal(first, encoder(["ab", "abc", "ab"]))
    encoder.encoded.clear()
    cache(encoder, ["abc", "abcd"])  # "ab" is the least recently used: evicted
    assert encoder.encoded == ["abcd"] and list(cache.entries) == ["abc", "abcd"]


def test_context_cache_gives_the_encoders_contexts(task):
    captions = ["a red circle in the top left", "", "a red circle in the top left"]
    with torch.no_grad():
        batched = task.conditioner(captions)
        one_by_one = torch.cat([task.conditioner([c]) for c in captions])
        cached = ContextCache(8)(task.conditioner, captions)
        assert torch.equal(cached, one_by_one)  # whatever batch first met a caption: exact resume
        torch.testing.assert_close(cached, batched)
        assert torch.equal(ContextCache(0)(task.conditioner, captions), batched)


class CountingMoments:
    """Moments that identify their image (its mean value), counting the batches encoded."""

    def __init__(self):
        self.batch_sizes: list[int] = []

    def __call__(self, images):
        self.batch_sizes.append(len(images))
        return images.mean(dim=(1, 2, 3))[:, None, None, None].expand(-1, 2, 1, 1).clone()


def test_image_digest_tells_images_apart_by_value_not_identity():
    image = torch.rand(3, 8, 8)
    assert image_digest(image) == image_digest(image.clone())
    assert image_digest(image) != image_digest(image.flip(-1))
    assert image_digest(image) != image_digest(image.double())
    assert image_digest(image) != image_digest(image.reshape(3, 4, 16))


def test_posterior_cache_encodes_only_unseen_images_in_an_even_batch():
    images = torch.rand(6, 3, 4, 4)
    encode, cache = CountingMoments(), PosteriorCache(max_entries=6)
    first = cache(encode, images[:3])
    assert encode.batch_sizes == [4]  # three unseen images, the last twice: an even batch
    assert torch.equal(first, CountingMoments()(images[:3]))
    encode.batch_sizes.clear()
    seen = images[[2, 0, 1, 0]]
    assert torch.equal(cache(encode, seen), CountingMoments()(seen))
    assert encode.batch_sizes == []  # every image seen before: no encoder pass
    mixed = images[[0, 3, 4, 3]]
    assert torch.equal(cache(encode, mixed), CountingMoments()(mixed))
    assert encode.batch_sizes == [2]  # images 3 and 4 only, image 3 once


def test_posterior_cache_evicts_the_least_recently_used():
    images = torch.rand(4, 3, 4, 4)
    encode, cache = CountingMoments(), PosteriorCache(max_entries=2)
    cache(encode, images[:2])
    cache(encode, images[:1])  # image 0 is now the most recently used
    cache(encode, images[2:3])  # image 1 goes
    assert list(cache.entries) == [image_digest(images[0]), image_digest(images[2])]
    assert len(PosteriorCache(0).entries) == 0
    assert torch.equal(PosteriorCache(0)(encode, images), encode(images))


@pytest.mark.parametrize("channels_last", [False, True])
def test_posterior_cache_gives_the_latents_the_encoder_gives(train_config, channels_last):
    """Cached images give bit-identical latents to encoding the whole batch afresh, with the same
    random numbers: the cache changes the time a step takes, not its numbers (so resume stays exact)."""
    fresh_task = _task(train_config, f"task.channels_last={channels_last}")
    cached_task = _task(train_config, f"task.channels_last={channels_last}", "task.posterior_cache_size=16")
    cached_task.load_state_dict(fresh_task.state_dict())
    images = torch.rand(9, 3, fresh_task.image_size, fresh_task.image_size) * 2 - 1
    for part in (images[:4], images[4:7]):  # seen first in other batches (the second of odd size)
        cached_task.encode_batch({"image": part, "caption": [""] * len(part)}, drop_captions=False)
    for rows in ([6, 1, 3, 4], [7, 8, 2, 5], [0, 8, 1, 2]):  # seen; two unseen; one seen only now
        batch = {"image": images[rows], "caption": [""] * 4}
        torch.manual_seed(0)
        fresh, _ = fresh_task.encode_batch(batch, drop_captions=False)
        torch.manual_seed(0)
        cached, _ = cached_task.encode_batch(batch, drop_captions=False)
        assert torch.equal(cached, fresh), rows
    assert len(cached_task.posterior_cache.entries) == 9


def _task(train_config, *overrides):
    cfg = train_config(*overrides)
    return instantiate(cfg.task, _partial_=True, _convert_="all")(run_config={"seed": 0})
