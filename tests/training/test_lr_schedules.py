"""Learning-rate schedules: short runs work with the recipes' warmups."""

import pytest
from hydra.utils import instantiate

from ldm.training.lr_schedules import WarmupCosine
from ldm_testing import compose_config


def test_a_warmup_longer_than_the_run_is_shortened_with_one_line(capsys):
    # `python train.py trainer.max_steps=10`: the toy's 100 warmup steps used to stop Hydra with a traceback
    cfg = compose_config("train", ["trainer.max_steps=10"])
    schedule = instantiate(cfg.optim.lr_scheduler.schedule)
    assert schedule.warmup_steps == 1 and schedule.total_steps == 10
    assert capsys.readouterr().err == "warning: warmup_steps 100 >= the run's 10 steps: warming up for 1 instead\n"
    factors = [schedule(step) for step in range(11)]
    assert factors[0] == 1.0 and factors[10] == 0.0 and factors == sorted(factors, reverse=True)


def test_a_warmup_shorter_than_the_run_is_kept(capsys):
    assert WarmupCosine(warmup_steps=100, total_steps=101).warmup_steps == 100
    assert WarmupCosine(warmup_steps=5, total_steps=3).warmup_steps == 0  # a 3-step run: no warmup at all
    assert "warming up for 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="trainer.max_steps"):
        WarmupCosine(warmup_steps=0, total_steps=-1)  # max_steps=-1: no end to decay to
