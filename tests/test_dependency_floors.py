"""pyproject.toml's floors admit no release the code relies on not being, and the installed ones meet them."""

from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# package -> (the lowest acceptable floor, why)
MINIMUM_FLOORS = {
    "torch": (
        "2.10",
        "torch.load(weights_only=True) is our only guard against hostile checkpoints: bypassed "
        "before 2.6 (CVE-2025-32434), memory corruption before 2.10 (CVE-2026-24747); "
        "torch.nn.utils.get_total_norm (ldm/training/guards.py) is new in 2.6",
    ),
    "torchvision": ("0.25", "the release paired with torch 2.10"),
    "pytorch-lightning": ("2.6", "Trainer.fit(weights_only=) (train.py) is new in 2.6.0"),
    "hydra-core": (
        "1.3.6",
        "instantiate's _target_ blocklist came in 1.3.4; aliases such as logging.os.system "
        "bypassed it until 1.3.6 (GHSA-37p2-j732-x8pj)",
    ),
    "pillow": ("10.0.1", "decodes untrusted WebP: libwebp heap overflow CVE-2023-4863 fixed in 10.0.1"),
}


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return {Requirement(line).name.lower(): Requirement(line) for line in project["dependencies"]}


def _floor(requirement: Requirement) -> Version | None:
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=", ">")]
    return max(floors, default=None)


@pytest.mark.parametrize("package", sorted(MINIMUM_FLOORS))
def test_each_floor_is_at_least_the_release_the_code_relies_on(package):
    minimum, why = MINIMUM_FLOORS[package]
    requirement = _requirements()[package]
    floor = _floor(requirement)
    assert floor is not None and floor >= Version(minimum), f"{requirement}: needs >={minimum} ({why})"


def test_installed_versions_satisfy_every_floor_and_cap():
    for name, requirement in _requirements().items():
        installed = Version(metadata.version(name))
        # (the base version: a local build such as 2.14.1+cpu is that release)
        assert requirement.specifier.contains(installed.base_version), f"{name} {installed} is outside {requirement}"
