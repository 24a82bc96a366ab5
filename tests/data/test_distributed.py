"""Two DDP ranks on the CPU over shards of 5, 17 and 40 samples (and one unreadable shard): both run
the same number of steps, draw different training streams, see disjoint validation samples that
together cover the validation set, and nothing hangs."""

import csv
import json
import sys
from pathlib import Path

import pytest
from shard_corpus import write_good_shard

from ldm_testing import launch_ranks

HERE = Path(__file__).resolve().parent


def _run(out: Path, train: list[str], val: list[str]) -> str:
    """Both ranks of ddp_run.py started at once, as torchrun would; rank 0's output."""
    return launch_ranks([sys.executable, str(HERE / "ddp_run.py"), str(out), json.dumps(train), json.dumps(val)], out)[
        0
    ]


@pytest.mark.slow
def test_ddp_ranks_run_equal_steps_on_uneven_shards(tmp_path):
    shards = [
        write_good_shard(tmp_path / f"part{i}.tar", [f"p{i}-{j:03d}" for j in range(n)], size=(8, 8))
        for i, n in enumerate((5, 17, 40))
    ]
    (tmp_path / "broken.tar").write_bytes(b"not a tar" * 100)
    out = tmp_path / "run"
    out.mkdir()
    _run(out, shards + [str(tmp_path / "broken.tar")], shards)

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # the same number of steps (12 = 2 epochs of 48 samples / (2 ranks x 4)), full batches only
    assert [r["global_step"] for r in ranks] == [12, 12]
    assert [len(r["train"]) for r in ranks] == [12, 12]
    assert all(len(batch) == 4 for r in ranks for batch in r["train"])
    # different training streams
    assert ranks[0]["train"] != ranks[1]["train"]
    every_key = {f"p{i}-{j:03d}" for i, n in enumerate((5, 17, 40)) for j in range(n)}
    assert {k for r in ranks for batch in r["train"] for k in batch} <= every_key
    # validation after each epoch: disjoint across ranks, together the whole set, each once
    assert [len(r["val"]) for r in ranks] == [2, 2]
    for run in (0, 1):
        seen = [ranks[0]["val"][run], ranks[1]["val"][run]]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(every_key)
    # rank 0 read parts 0 and 2 (45 samples), rank 1 part 1 (17): uneven, and still no hang
    assert sorted(map(len, ranks[0]["val"])) == [45, 45]

    # the unreadable shard was counted on both ranks, summed in the log and in the report
    report = (out / "report.txt").read_text()
    assert "2 ranks" in report and "skipped/unreadable_shard" in report
    with open(out / "logs" / "version_0" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("data/skipped/unreadable_shard")]
    assert rows and float(rows[-1]["data/skipped/unreadable_shard"]) >= 2
