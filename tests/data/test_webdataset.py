"""The streams and the DataModule: seeds per rank and worker, epochs, mixing, validation splits, config."""

import itertools
from collections import Counter

import pytest
import torch
from hydra.utils import instantiate
from shard_corpus import write_good_shard
from torch.utils.data import DataLoader

from ldm.data.samples import ToTrainingSample
from ldm.data.shards import ShardSpecError, Source
from ldm.data.streams import ShardStream, StreamStart
from ldm.data.training_loader import TrainingLoader
from ldm.data.transforms import ImageTransform
from ldm.data.webdataset import ShardDataModule, image_caption_pipeline
from ldm_testing import compose_config, run_training_loader


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> list[str]:
    """Three shards of 5, 17 and 40 samples, keys u0-000 ... u2-039."""
    directory = tmp_path_factory.mktemp("uneven")
    return [
        write_good_shard(directory / f"u{i}.tar", [f"u{i}-{j:03d}" for j in range(n)], size=(8, 8))
        for i, n in enumerate((5, 17, 40))
    ]


def _train(urls, seed=0, epoch=0, **options) -> ShardStream:
    options.setdefault("shuffle_buffer", 10)
    stream = ShardStream([Source(urls)], ToTrainingSample(ImageTransform(8)), 4, train=True, seed=seed, **options)
    stream.start = StreamStart(epoch)
    return stream


def _val(urls, **options) -> ShardStream:
    return ShardStream([Source(urls)], ToTrainingSample(ImageTransform(8)), 4, train=False, **options)


def _keys(batches, n=None) -> list[str]:
    return [key for batch in itertools.islice(batches, n) for key in batch["key"]]


def test_training_batches_from_toy_shards(toy_data_dir):
    urls = sorted(str(p) for p in (toy_data_dir / "toy").glob("train-*.tar"))
    pipeline = image_caption_pipeline(urls, ImageTransform(64), batch_size=8, train=True, shuffle_buffer=16)
    for batch in itertools.islice(iter(pipeline), 3):
        assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype == torch.float32
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert len(batch["caption"]) == 8 and all(c.startswith("a ") for c in batch["caption"])
        assert batch["skipped"] == {}


def test_validation_reads_each_sample_once(toy_data_dir):
    urls = sorted(str(p) for p in (toy_data_dir / "toy").glob("val-*.tar"))
    pipeline = image_caption_pipeline(urls, ImageTransform(64), batch_size=10, train=False)
    sizes = [len(b["caption"]) for b in pipeline]
    assert sum(sizes) == 32 and sizes[-1] == 2  # the last partial batch is kept


def test_the_seed_makes_streams_reproducible_and_each_rank_different(uneven):
    first = _keys(iter(_train(uneven, rank=0, world_size=2)), 10)
    assert first == _keys(iter(_train(uneven, rank=0, world_size=2)), 10)
    for other in (
        _train(uneven, rank=1, world_size=2),
        _train(uneven, seed=1, rank=0, world_size=2),
        _train(uneven, rank=0, world_size=2, epoch=1),
    ):  # each epoch draws anew
        assert _keys(iter(other), 10) != first


class CountingSample:
    """A to_sample that counts its calls (decodes), to show a resume decodes nothing it had read."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, raw, rng):
        self.calls += 1
        return self.inner(raw, rng)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_where_it_stopped_without_decoding_what_it_read(uneven, workers):
    def make_stream():
        return ShardStream(
            [Source(uneven[:2], 2.0), Source(uneven[2:])],
            ToTrainingSample(ImageTransform(8)),
            4,
            train=True,
            seed=3,
            shuffle_buffer=20,
            rank=0,
            world_size=1,
        )

    straight, saved = run_training_loader(make_stream, workers, 0, None, 24, save_at=13)  # 13: mid-round with 2 workers
    assert saved["done"] == 13 and len(saved["workers"]) == max(workers, 1)
    resumed, _ = run_training_loader(make_stream, workers, 13, saved["workers"], 11)
    assert [b["key"] for b in resumed] == [b["key"] for b in straight[13:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, straight[13:]))

    # the first batch after a resume deep into the stream decodes its own samples, nothing before
    deep, deep_state = run_training_loader(make_stream, 0, 0, None, 200, save_at=199)
    counting = CountingSample(ToTrainingSample(ImageTransform(8)))
    stream = ShardStream(
        [Source(uneven[:2], 2.0), Source(uneven[2:])],
        counting,
        4,
        train=True,
        seed=3,
        shuffle_buffer=20,
        rank=0,
        world_size=1,
    )
    stream.start = StreamStart(0, 199, deep_state["workers"])
    assert next(iter(stream))["key"] == deep[199]["key"] and counting.calls == 4


def test_changing_the_number_of_workers_starts_a_new_epoch_with_one_warning(uneven, tmp_path, capsys):
    from ldm.data.stream_datamodule import POSITION_FORMAT

    datamodule = ShardDataModule(shards=uneven, image_size=8, batch_size=4, num_workers=0, shuffle_buffer=10, seed=3)
    datamodule.setup("fit")

    class Trainer:  # what the DataModule reads of Lightning's trainer
        global_step, accumulate_grad_batches, world_size, global_rank = 7, 1, 1, 0

    datamodule.trainer = Trainer()
    shape = {**datamodule.shape(), "num_workers": 2}  # the checkpoint's run had two workers
    datamodule.load_state_dict(
        {
            "format": POSITION_FORMAT,
            "shape": shape,
            "epoch_base": [0, 0],
            "ranks": [{"epoch": 0, "done": 7, "workers": [None, None]}],
        }
    )
    loader = datamodule.train_dataloader()
    warning = capsys.readouterr().err.strip().splitlines()
    assert (
        len(warning) == 1 and "loader workers per rank: 2 then, 1 now" in warning[0] and "new epoch (1)" in warning[0]
    )
    assert datamodule._position() == (1, 0) and loader.position_state()["epoch"] == 1
    # epoch 1's streams: not those of epoch 0, which the run had started with
    first = next(iter(loader))["key"]
    assert first == next(iter(_train(uneven, seed=3, epoch=1, rank=0, world_size=1)))["key"]
    assert first != next(iter(_train(uneven, seed=3, epoch=0, rank=0, world_size=1)))["key"]


def test_each_worker_draws_its_own_stream(uneven):
    def worker_keys():
        loader = DataLoader(_train(uneven, rank=0, world_size=1), batch_size=None, num_workers=2)
        batches = list(itertools.islice(loader, 8))  # workers take turns: 0, 1, 0, 1, ...
        return _keys(batches[0::2]), _keys(batches[1::2])

    worker0, worker1 = worker_keys()
    assert worker0 != worker1
    assert (worker0, worker1) == worker_keys()  # and the same ones again with the same seed


def test_samples_per_epoch_gives_every_rank_the_same_number_of_batches(uneven):
    per_rank = [
        len(list(_train(uneven[:1] if rank else uneven, rank=rank, world_size=2, samples_per_epoch=40)))
        for rank in (0, 1)
    ]
    assert per_rank == [5, 5]  # ceil(40 / (2 ranks x 1 worker x 4)), whatever the shards
    epoch = iter(range(2))
    loader = TrainingLoader(
        _train(uneven, rank=0, world_size=2, samples_per_epoch=40),
        lambda stream: DataLoader(stream, batch_size=None, num_workers=2),
        2,
        lambda: (next(epoch), 0),
    )
    epochs = [_keys(loader) for _ in range(2)]
    assert [len(keys) for keys in epochs] == [24, 24]  # 2 workers x ceil(40 / (2 x 2 x 4)) x 4
    assert epochs[0] != epochs[1]  # each epoch draws anew


def test_sources_mix_in_proportion_to_their_weights(tmp_path):
    sources = []
    for name, weight in (("big", 3.0), ("small", 1.0)):
        urls = [
            write_good_shard(tmp_path / f"{name}{i}.tar", [f"{name}{i}-{j:02d}" for j in range(20)], size=(8, 8))
            for i in range(3)
        ]
        sources.append(Source(urls, weight))
    stream = ShardStream(sources, ToTrainingSample(ImageTransform(8)), 20, train=True, shuffle_buffer=50)
    keys = _keys(iter(stream), 80)
    share = Counter(key.rstrip("0123456789-") for key in keys)["big"] / len(keys)
    assert 0.70 < share < 0.80  # 3 : 1 (1600 draws: 3 standard deviations is 0.03)


def _val_keys_per_rank(urls, world_size, num_workers):
    per_rank = []
    for rank in range(world_size):
        loader = DataLoader(_val(urls, rank=rank, world_size=world_size), batch_size=None, num_workers=num_workers)
        per_rank.append(_keys(loader))
    return per_rank


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (2, 0), (3, 3), (4, 1)])
def test_validation_splits_disjointly_across_ranks_and_workers(uneven, world_size, num_workers):
    # 3 shards: 2 ranks split shards; 3 and 4 ranks split samples within shards; 3 workers with one
    # or two shards each leave some workers idle, which must not hang or fail
    per_rank = _val_keys_per_rank(uneven, world_size, num_workers)
    everything = [key for keys in per_rank for key in keys]
    assert len(everything) == len(set(everything)) == 62
    assert all(per_rank)  # every rank has data
    if world_size > 3:
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 3


def test_datamodule_from_the_real_config(uneven, tmp_path):
    cfg = compose_config(
        "train",
        [
            "data=webdataset",
            f"data.shards={uneven[0].rsplit('/', 1)[0]}/u*.tar",
            f"data.val_shards={uneven[2]}",
            "data.num_workers=0",
            "data.batch_size=4",
            "data.image_size=16",
            "data.filters.max_unsafe=0.5",
            "seed=7",
        ],
    )
    datamodule = instantiate(cfg.data, _convert_="all")
    assert datamodule.seed == 7
    datamodule.setup("fit")
    assert [len(source.urls) for source in datamodule.train_sources] == [3]
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.uint8  # 4x less to move
    images = datamodule.on_after_batch_transfer(batch, 0)["image"]  # what Lightning hands the task
    assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, batch["image"].float() / 127.5 - 1)
    assert len(_keys(datamodule.val_dataloader())) == 40


def test_datamodule_mixes_sources_and_checks_specs(uneven, tmp_path):
    datamodule = ShardDataModule(
        sources=[{"shards": uneven[0], "weight": 0.7}, {"shards": uneven[1:], "weight": 0.3}],
        image_size=8,
        batch_size=4,
        num_workers=0,
    )
    datamodule.setup("fit")
    assert [(len(s.urls), s.weight) for s in datamodule.train_sources] == [(1, 0.7), (2, 0.3)]
    assert len(next(iter(datamodule.train_dataloader()))["key"]) == 4
    for bad, match in (
        ({"shards": uneven[0], "sources": [{"shards": uneven[1]}]}, "not both"),
        ({"sources": [{"shards": uneven[1], "weight": 0}]}, "weight must be positive"),
        ({"sources": [{"shard": uneven[1]}]}, r"sources\[0\] needs a 'shards'"),
        ({}, "no training data"),
        ({"shards": str(tmp_path / "none-{000..003}.tar")}, "none-"),
    ):
        with pytest.raises(ShardSpecError, match=match):
            ShardDataModule(**bad).setup("fit")


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_datamodule_runs_prepare_and_validation_uses_no_more_workers_than_shards(toy_data_dir):
    calls = []
    datamodule = ShardDataModule(
        shards=str(toy_data_dir / "toy" / "train-*.tar"),
        val_shards=str(toy_data_dir / "toy" / "val-*.tar"),
        image_size=32,
        batch_size=4,
        num_workers=3,
        prepare=lambda: calls.append(1),
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert calls == [1] and len(datamodule.train_sources[0].urls) == 2
    assert datamodule.val_dataloader().num_workers == 1  # one val shard
    assert datamodule.train_dataloader().num_workers == 3
