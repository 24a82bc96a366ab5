"""Tiny training runs one after another in every process of a multi-rank launch (``ldm_testing.launch_ranks``):

    python rank_jobs.py JOBS.json      JOBS = [{"out": RUN_DIR, "overrides": [Hydra overrides of train.yaml]}, ...]

Each rank composes the same configs and calls ``train.train``; the ranks share one process group for
all the jobs (Lightning reuses it), so a test of N runs pays for the imports and the start once.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

from omegaconf import open_dict

from ldm_testing import compose_config
from train import train


def main(jobs_file: Path) -> None:
    warnings.filterwarnings("ignore")
    environment = dict(os.environ)
    for job in json.loads(jobs_file.read_text()):
        cfg = compose_config("train", job["overrides"])
        with open_dict(cfg):
            cfg.paths.output_dir = job["out"]
        train(cfg)
        os.environ.clear()  # Lightning's environment teardown removes WORLD_SIZE; the next job needs it
        os.environ.update(environment)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
