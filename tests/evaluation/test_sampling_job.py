"""The sampling job: rank shares, prompt sources, and 2 CPU ranks (gloo) killed midway and finished by a rerun."""

import json
import sys
import time

import numpy as np
import pytest
from PIL import Image

from ldm.errors import UserError
from ldm.evaluation.sampling_job import JobItem, Ranks, job_items, read_prompt_records
from ldm_testing import ROOT, compose_config, kill_ranks, start_ranks, wait_ranks
from sample import sample

PROMPTS = ["a red circle in the top left", "a blue square in the center", "a green triangle in the bottom left"]


def _start(checkpoint, out_dir, prompts_file, extra=()):
    command = [
        sys.executable,
        "sample.py",
        f"checkpoint={checkpoint}",
        f"prompts_file={prompts_file}",
        "num_images_per_prompt=4",
        "steps=2",
        "batch_size=2",
        f"out_dir={out_dir}",
        *extra,
    ]
    return start_ranks(command, ROOT)


def test_job_items_and_rank_split_are_disjoint_and_complete():
    items = job_items([{"prompt": p} for p in PROMPTS], 4, seed=10)
    assert [i.seed for i in items] == list(range(10, 22))
    shares = [Ranks(r, 3, 0).mine(items) for r in range(3)]
    indices = sorted(i.index for share in shares for i in share)
    assert indices == list(range(12))
    assert not set(i.index for i in shares[0]) & set(i.index for i in shares[1])
    assert items[5] == JobItem(5, PROMPTS[1], 15, {})


@pytest.mark.slow
def test_two_ranks_killed_midway_then_rerun_write_the_whole_set_once(tiny_checkpoint, tmp_path):
    # one multi-process test for both properties: each ~10 s rank start-up is most of its cost
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 4) + "\n")  # 48 images
    out = tmp_path / "out"
    ranks = _start(tiny_checkpoint, out, prompts, extra=["steps=4"])
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("0*.png"))) < 6:
        time.sleep(0.2)
    kill_ranks(ranks)
    made_before = len(list(out.glob("0*.png")))
    assert 0 < made_before < 48

    wait_ranks(_start(tiny_checkpoint, out, prompts, extra=["steps=4"]), timeout=600)
    names = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert names == [f"{i:06d}.png" for i in range(48)]
    assert not list(out.glob(".*.tmp"))  # no leftovers of the killed writes
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(48))
    assert {r["index"]: r["prompt"] for r in rows}[4] == PROMPTS[1]

    # the same job in one process gives the same images (each image depends only on its seed)
    sample(
        compose_config(
            "sample",
            [
                f"checkpoint={tiny_checkpoint}",
                f"prompts_file={prompts}",
                "num_images_per_prompt=4",
                "steps=4",
                "batch_size=5",
                f"out_dir={tmp_path / 'one'}",
            ],
        )
    )
    for name in names:
        a = np.asarray(Image.open(out / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "one" / name)).astype(int)
        assert np.abs(a - b).max() <= 1


def test_prompt_sources(tmp_path):
    import io
    import tarfile

    shard = tmp_path / "captions-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, text in (("a", "first caption"), ("b", "second caption")):
            data = text.encode()
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    records = read_prompt_records(None, None, str(shard))
    assert [(r["prompt"], r["key"]) for r in records] == [("first caption", "a"), ("second caption", "b")]


def test_prompts_from_a_broken_shard_are_refused_in_one_line(tmp_path):
    import io
    import tarfile

    shard = tmp_path / "captions-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key in ("a", "b", "c"):
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = 600
            tar.addfile(info, io.BytesIO(b"x" * 600))
    shard.write_bytes(shard.read_bytes()[:1500])  # cut inside the second caption
    with pytest.raises(UserError, match="truncated shard.*prompts would be incomplete"):
        read_prompt_records(None, None, str(shard))


def test_stale_temporaries_of_this_ranks_files_are_removed(tmp_path):
    from ldm.evaluation.sampling_job import FolderOutput, remove_stale_temporaries

    for name in (".000000.png.ab12cd34.tmp", ".000001.png.xy_9ab00.tmp", ".000000.png", "000000.png", ".other.tmp"):
        (tmp_path / name).write_text("x")
    items = job_items([{"prompt": p} for p in PROMPTS], 1, seed=0)  # indices 0, 1, 2
    mine = Ranks(0, 2, 0).mine(items)  # this rank: 0 and 2; rank 1 may be writing 000001 right now
    assert remove_stale_temporaries(tmp_path, FolderOutput(tmp_path).files_of(mine, items)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".000000.png",
        ".000001.png.xy_9ab00.tmp",
        ".other.tmp",
        "000000.png",
    ]


@pytest.mark.slow
def test_two_ranks_write_every_item_of_shard_output_exactly_once(tiny_checkpoint, tmp_path):
    import tarfile

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")  # 12 items in shards of 5: 5 + 5 + 2
    out = tmp_path / "out"
    outputs = wait_ranks(
        _start(tiny_checkpoint, out, prompts, extra=["output=shards", "samples_per_shard=5", "steps=1"]), timeout=600
    )
    assert "12/12 images" in outputs[0]
    indices = []
    for shard in sorted(out.glob("samples-*.tar")):
        with tarfile.open(shard) as tar:
            pngs = [m.name for m in tar if m.name.endswith(".png")]
            rows = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
        assert [r["index"] for r in rows] == [int(name[:-4]) for name in pngs]
        indices.extend(r["index"] for r in rows)
    assert sorted(indices) == list(range(12)) and len(indices) == 12  # each item exactly once


def test_shards_are_owned_by_one_rank_each():
    from ldm.evaluation.sampling_job import ShardOutput

    items = job_items([{"prompt": p} for p in PROMPTS], 4, seed=0)  # 12 items
    output = ShardOutput.__new__(ShardOutput)
    output.samples_per_shard = 5
    shares = [Ranks(r, 2, 0).mine(items, output.owner_key) for r in range(2)]
    assert [i.index for i in shares[0]] == [0, 1, 2, 3, 4, 10, 11]
    assert [i.index for i in shares[1]] == [5, 6, 7, 8, 9]


def test_the_checkpoint_fingerprint_samples_large_files_and_ignores_the_path(tmp_path):
    from ldm.evaluation.sampling_job import FINGERPRINT_WHOLE_BYTES, checkpoint_fingerprint

    data = bytearray(np.random.default_rng(0).integers(0, 256, FINGERPRINT_WHOLE_BYTES + (8 << 20), dtype=np.uint8))
    a, b = tmp_path / "a.safetensors", tmp_path / "elsewhere" / "b.safetensors"
    b.parent.mkdir()
    a.write_bytes(data)
    b.write_bytes(data)
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(b)  # content, not path or mtime
    for offset in (10, len(data) - 10):  # the header, the tail
        changed = bytearray(data)
        changed[offset] ^= 1
        b.write_bytes(changed)
        assert checkpoint_fingerprint(b) != checkpoint_fingerprint(a)
    b.write_bytes(data + b"x")
    assert checkpoint_fingerprint(b) != checkpoint_fingerprint(a)  # the size


def test_claim_out_dir_deletes_only_sampling_job_files(tmp_path):
    from ldm.evaluation.sampling_job import claim_out_dir

    manifest = {"checkpoint": "c", "prompts": "p", "num_prompts": 1, "settings": {"steps": 20}}
    claim_out_dir(tmp_path, manifest)
    keep = ["notes.txt", "000001.jpg", "12.png", "samples-000000.tar.gz", ".hidden"]
    drop = ["000000.png", "000001.png", "samples-000003.tar", "metadata.jsonl", "grid.png", ".000002.png.x1y2_3z4.tmp"]
    for name in keep + drop:
        (tmp_path / name).write_text("x")
    (tmp_path / "000009.png").mkdir()  # a directory is never deleted
    claim_out_dir(tmp_path, manifest)  # the same job: untouched
    assert all((tmp_path / name).exists() for name in keep + drop)
    other = {**manifest, "settings": {"steps": 3}}
    with pytest.raises(UserError, match=r"another job \(steps 20 -> 3\)"):
        claim_out_dir(tmp_path, other)
    claim_out_dir(tmp_path, other, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "000009.png", "job.json"])
