"""Every config under configs/ composes, and every group option instantiates its objects."""

from pathlib import Path

import pytest
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from bench.presets import network_configs
from ldm_testing import CONFIGS, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
GROUP_OPTIONS = [
    (group, p.stem)
    for group in ("schedule", "objective", "sampler", "optim", "logger", "data")
    for p in sorted((CONFIGS / group).glob("*.yaml"))
]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_config("train", [f"experiment={experiment}"])
    assert cfg.task._target_ and cfg.trainer.max_steps > 0


def _targets(node):
    """Every ``_target_`` in a plain config tree."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "_target_"] + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_every_group_option_composes_to_code_that_exists(group, option):
    cfg = compose_config("train", [f"{group}={option}"])
    assert cfg.hydra.runtime.choices[group] == option
    # every interpolation resolves (a key renamed elsewhere breaks it); ??? marks what the user must give
    node = OmegaConf.to_container(cfg[group], resolve=True, throw_on_missing=False)
    targets = _targets(node)
    assert targets or (group, option) == ("logger", "none")  # logger=none composes to an empty node
    for target in targets:
        assert callable(get_object(target)), target


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIGS / "schedule").glob("*.yaml")))
def test_schedules_instantiate(option):
    cfg = compose_config("train", [f"schedule={option}"])
    schedule = instantiate(cfg.schedule)
    assert schedule.num_timesteps == 1000


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIGS / "objective").glob("*.yaml")))
def test_objectives_instantiate(option):
    cfg = compose_config("train", [f"objective={option}"])
    expected = cfg.model.prediction_type if option == "default" else option
    assert instantiate(cfg.objective).prediction_type == expected


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIGS / "sampler").glob("*.yaml")))
def test_samplers_instantiate(option):
    cfg = compose_config("sample", [f"sampler={option}", "checkpoint=x.ckpt"])
    assert callable(instantiate(cfg.sampler))


def test_toy_model_instantiates_with_expected_shapes():
    import torch

    cfg = compose_config("train", ["model.autoencoder.path=null"])
    unet = instantiate(cfg.model.unet)
    autoencoder = instantiate(cfg.model.autoencoder)
    conditioner = instantiate(cfg.model.conditioner)
    assert autoencoder.downsampling_factor == 4 and conditioner.context_dim == cfg.model.unet.context_dim
    with torch.no_grad():
        z = autoencoder.encode_to_latent(torch.zeros(1, 3, 64, 64))
        out = unet(z, torch.tensor([10]), conditioner(["a red circle in the top left"]))
    assert z.shape == out.shape == (1, 4, 16, 16)


def test_every_config_file_is_documented():
    # each group option starts with a comment saying what it is (docs/configuration.md indexes them)
    for path in sorted(Path(CONFIGS).rglob("*.yaml")):
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{path.relative_to(CONFIGS)} has no leading comment"


@pytest.mark.parametrize(
    "model, family, text_width", [("sd15", "sd1", 768), ("sd21_base", "sd2", 1024), ("sd21_768", "sd2", 1024)]
)
def test_sd_model_configs_are_what_published_files_import_as(model, family, text_width):
    # the presets are the one place the published sizes are written; a published file's weights must
    # import as exactly these configs (the shapes of diffusers' published configs: tests/models/)
    import torch

    from ldm.formats.architecture import text_config_from_weights, unet_config_from_weights, vae_config_from_weights

    cfg = compose_config("train", [f"model={model}"])
    with torch.device("meta"):  # shapes only: no memory, no time
        unet = instantiate(cfg.model.unet)
        vae = instantiate(cfg.model.autoencoder)
        conditioner = instantiate(cfg.model.conditioner)
    presets = network_configs(model)
    plain = lambda config: {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}  # noqa: E731
    unet_config, vae_config = (
        unet_config_from_weights(unet.state_dict(), family),
        vae_config_from_weights(vae.state_dict()),
    )
    assert plain(unet_config) == {
        "dropout": 0.0,
        "norm_groups": 32,
        **presets["unet"],
    }  # the preset leaves SD's defaults
    assert plain(vae_config) == {"in_channels": 3, "out_channels": 3, "norm_groups": 32, **presets["vae"]}
    assert text_config_from_weights(conditioner.model.state_dict(), family) == presets["text"]
    assert conditioner.context_dim == text_width == cfg.model.unet.context_dim
    assert cfg.objective.prediction_type == ("v" if model == "sd21_768" else "eps")


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_config("train", ["hydra/launcher=slurm", "hydra.launcher.nodes=4"])
    assert cfg.hydra.launcher.nodes == 4 and cfg.hydra.launcher.signal_delay_s == 300
    assert "SlurmLauncher" in cfg.hydra.launcher._target_


@pytest.mark.parametrize("strategy", ["auto", "ddp", "fsdp", "fsdp2", "deepspeed"])
def test_strategies_compose_into_the_trainer(strategy):
    cfg = compose_config("train", [f"strategy={strategy}"])
    assert cfg.trainer.strategy._target_ == cfg.strategy._target_
    if strategy in ("auto", "ddp", "fsdp2"):
        built = instantiate(cfg.strategy)
        expected = {"auto": "auto", "ddp": "DDPStrategy", "fsdp2": "FSDP2Strategy"}[strategy]
        assert built == "auto" if strategy == "auto" else type(built).__name__ == expected
    if strategy == "fsdp2":  # (tests/training/test_fsdp2.py trains with it on two CPU ranks)
        assert built.shards_parameters and built.reshard_after_forward and not built._save_distributed_checkpoint


def test_fsdp_strategy_wraps_unet_blocks():
    # Lightning runs FSDP on GPUs only; on the CPU we check what it would wrap (docs/cluster.md has the GPU command)
    from ldm.models.attention import SpatialTransformer
    from ldm.models.unet import ResBlock

    strategy = instantiate(compose_config("train", ["strategy=fsdp"]).strategy)
    assert type(strategy).__name__ == "FSDPStrategy"
    assert strategy.kwargs["use_orig_params"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    assert {ResBlock, SpatialTransformer} <= set(getattr(policy, "_module_classes", policy))


def test_every_recorded_sweep_run_names_existing_options():
    # bench/toy_sweep_runs/*.txt record the overrides behind docs/toy.md's tables: they must stay
    # runnable. Composing each of their ~70 lines costs ~20 s, so compose once per choice of config
    # groups and check that every other key exists in that config.
    import shlex

    from omegaconf import OmegaConf

    runs = [
        shlex.split(line)[1:]
        for path in sorted((CONFIGS.parent / "bench" / "toy_sweep_runs").glob("*.txt"))
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(runs) > 50
    composed = {}
    for overrides in runs:
        groups = tuple(o for o in overrides if (CONFIGS / o.split("=")[0]).is_dir())
        if groups not in composed:
            composed[groups] = compose_config("train", list(groups))
        for override in set(overrides) - set(groups):
            key = override.lstrip("+~").split("=")[0]
            assert OmegaConf.select(composed[groups], key, default="<missing>") != "<missing>", (groups, override)
