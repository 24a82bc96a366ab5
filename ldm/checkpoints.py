"""Reading and writing weights safely: safetensors, or torch files loaded with weights_only=True."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.atomic import atomic_path
from ldm.errors import UserError

PACKAGE_PREFIX = "ldm:"


def resolve_path(path: str | Path) -> Path:
    """A filesystem path; ``ldm:assets/x`` names a file shipped inside the package.

    Configs saved into checkpoints keep the ``ldm:`` form, so a checkpoint still finds the toy's
    shipped weights after the project moves.
    """
    path = str(path)
    if path.startswith(PACKAGE_PREFIX):
        return Path(__file__).parent / path[len(PACKAGE_PREFIX) :]
    return Path(path).expanduser()


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A flat name -> tensor dict from ``.safetensors`` or a torch file; never unpickles code.

    Torch files holding a ``state_dict`` entry (Lightning and original SD ``.ckpt``) are unwrapped.
    """
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError and friends: say which file and why, once
        raise ValueError(f"{path} is not a loadable weights file ({type(error).__name__}: {error})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def save_safetensors(state: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a half-written file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def with_weights(module: nn.Module, path: str | None, prefix: str | None = None, strict: bool = True) -> nn.Module:
    """Load weights from ``path`` into ``module`` and return it (a Hydra-friendly wrapper).

    ``prefix`` selects the keys under it (e.g. ``first_stage_model.`` in an SD single file); by
    default it is found by locating the module's first parameter name in the file. ``path=None``
    returns the module untouched (random init, e.g. to train it from scratch).
    """
    if path is None:
        return module
    state = load_state_dict_file(path)
    if prefix is None:
        prefix = find_prefix(state, next(iter(module.state_dict())), path)
    module.load_state_dict(submodule_state(state, prefix), strict=strict)
    return module


def find_prefix(state: dict[str, Tensor], first_key: str, path: str | Path) -> str:
    """The prefix under which ``state`` holds a module whose first key is ``first_key``."""
    if first_key in state:
        return ""
    matches = [k[: -len(first_key)] for k in state if k.endswith("." + first_key)]
    if len(matches) != 1:
        raise UserError(f"{path}: cannot find the weights of this module (looked for '*{first_key}')")
    return matches[0]


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint written by ``train.py``: its ``state_dict`` and ``ldm`` entries.

    Raises a one-line error for a missing file or a file that is not one of ours.
    """

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpicklable or corrupt: name the file, not the pickle opcode
        raise UserError(f"{path} is not a readable training checkpoint ({type(error).__name__})") from error
    if not isinstance(checkpoint, dict) or "ldm" not in checkpoint or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not an ldm training checkpoint (no 'ldm' and 'state_dict' entries)")
    return checkpoint


def fingerprint_state(state: dict[str, Tensor]) -> str:
    """A short content hash of weights (names, shapes, sums), to check a frozen part is the same.

    Computed in float64 from the values, so an fp16 file and the float32 module loaded from it agree.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().to("cpu", torch.float64)
        digest.update(f"{name}{tuple(t.shape)}{t.sum().item():.9e}{t.abs().sum().item():.9e}".encode())
    return digest.hexdigest()[:16]


def fingerprint(module: nn.Module) -> str:
    """``fingerprint_state`` of a module's state dict."""
    return fingerprint_state(module.state_dict())


def submodule_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix`` with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
