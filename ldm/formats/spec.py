"""The typed model spec: what a checkpoint may say about how to build its networks, and nothing more.

A checkpoint is untrusted data. It never names code: it names the constructor arguments of our own
three network classes (checked against their signatures and limited to plain values), the schedule,
the prediction type and the image size. Frozen parts too big to embed are stored by reference
(``FrozenSource``: the local file they were loaded from, and the fingerprint of their weights).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ldm.diffusion.schedules import ScheduleSpec
from ldm.errors import UserError
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.conditioners import OpenCLIPTextEncoder
from ldm.models.unet import UNetModel

NETWORKS = {"unet_config": UNetModel, "vae_config": AutoencoderKL, "text_config": OpenCLIPTextEncoder}
PREDICTION_TYPES = ("eps", "v", "x0")
# arguments a stored spec may not set: weights arrive as tensors or through a FrozenSource (an open_clip
# ``pretrained`` tag, which older specs could carry, would make the loader fetch from a hub); a null one
# (what specs of the time held) is dropped
NOT_FROM_FILES = {"text_config": ("pretrained",)}
MAX_DEPTH = 4  # nesting of plain values in a constructor argument (text_cfg is a dict of scalars)


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """``value`` if it is JSON-like data of bounded depth with finite numbers, else a ``UserError``."""
    if depth > MAX_DEPTH:
        raise UserError(f"model spec: {where} is nested too deeply")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"model spec: {where} is not a finite number ({value})")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
    raise UserError(f"model spec: {where} holds a {type(value).__name__}, not a plain value")


def checked_network_config(field_name: str, config: Any) -> dict[str, Any]:
    """Constructor arguments for one of our networks, checked against its signature.

    Refuses unknown names (a stored spec cannot smuggle in ``_target_`` or other keys), values that
    are not plain data, and the arguments listed in ``NOT_FROM_FILES``.
    """
    cls = NETWORKS[field_name]
    if not isinstance(config, dict):
        raise UserError(f"model spec: {field_name} is not a mapping of constructor arguments")
    for name in NOT_FROM_FILES.get(field_name, ()):  # first: the refusal names why
        if config.get(name) is not None:
            raise UserError(f"model spec: {field_name}.{name} may not be set by a model file ({config[name]!r})")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted - set(NOT_FROM_FILES.get(field_name, ())))
    if unknown:
        raise UserError(f"model spec: {cls.__name__} takes no argument(s) {', '.join(map(str, unknown[:5]))}")
    dropped = NOT_FROM_FILES.get(field_name, ())
    checked = {name: _plain(value, f"{field_name}.{name}") for name, value in config.items() if name not in dropped}
    if field_name == "text_config":
        _check_local_text_tower(checked)
    return checked


def _check_local_text_tower(config: dict[str, Any]) -> None:
    """Refuse text towers whose construction would reach a hub: an ``hf-hub:`` name, a config name that
    open_clip does not ship, or a Hugging Face text model or tokenizer (``hf_*`` in the text config)."""
    import open_clip

    name = config.get("model_name")
    if name is not None and name not in open_clip.list_models():
        raise UserError(f"model spec: text_config.model_name {name!r} is not an open_clip config shipped locally")
    text_cfg = config.get("text_cfg") or (open_clip.get_model_config(name)["text_cfg"] if name else {})
    if not isinstance(text_cfg, dict):
        raise UserError("model spec: text_config.text_cfg is not a mapping")
    remote = sorted(k for k, v in text_cfg.items() if str(k).startswith("hf_") and v)
    if remote:
        raise UserError(
            f"model spec: the text tower names Hugging Face parts ({', '.join(remote)}), which load from a hub"
        )


def checked_schedule(schedule: Any) -> dict[str, Any]:
    """A stored schedule, checked into a ``ScheduleSpec`` (``kind`` + the beta function's arguments + the
    SNR options) and returned as its plain dict."""
    if not isinstance(schedule, dict):
        raise UserError("model spec: schedule is not a mapping")
    checked = {str(key): _plain(value, f"schedule.{key}") for key, value in schedule.items()}
    steps = checked.get("num_timesteps", 1000)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 2 <= steps <= 100_000:
        raise UserError(f"model spec: schedule.num_timesteps must be an integer in 2..100000, got {steps!r}")
    for name in ("beta_start", "beta_end", "offset", "max_beta", "snr_shift"):
        if name in checked and not (isinstance(checked[name], (int, float)) and not isinstance(checked[name], bool)):
            raise UserError(f"model spec: schedule.{name} must be a number, got {checked[name]!r}")
    try:
        return ScheduleSpec.from_dict(checked).to_dict()
    except (TypeError, ValueError) as error:
        raise UserError(f"model spec: {error}") from None


def checked_model_fields(prediction_type: Any, image_size: Any) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"model spec: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 8 <= image_size <= 16384:
        raise UserError(f"model spec: image_size must be an integer in 8..16384, got {image_size!r}")


FROZEN_KINDS = ("model", "weights", "seeded")


@dataclass(frozen=True)
class FrozenSource:
    """Where a frozen part left out of a checkpoint comes from.

    kind: ``model`` (a model file that ``load_bundle`` reads: SD single file, diffusers folder,
        training checkpoint), ``weights`` (a weights file of this module alone, ``prefix`` selecting
        its keys; for the text encoder any layout ``ldm.formats.text_encoder.load_text_weights`` knows), or
        ``seeded`` (the text encoder's seeded random init, rebuilt from the spec alone).
    path: a local path (``ldm:`` names a file shipped in the package); never a hub tag.
    fingerprint: ``ldm.checkpoints.fingerprint_state`` of the weights the run trained with.
    """

    kind: str
    fingerprint: str
    path: str | None = None
    prefix: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FROZEN_KINDS:
            raise UserError(f"frozen part source kind must be one of {FROZEN_KINDS}, got {self.kind!r}")
        if self.kind != "seeded" and not isinstance(self.path, str):
            raise UserError(f"a frozen part of kind {self.kind!r} needs a path")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> FrozenSource:
        if not isinstance(data, dict) or set(data) - {"kind", "fingerprint", "path", "prefix"}:
            raise UserError("checkpoint: a frozen part's source is not a {kind, fingerprint, path, prefix} record")
        values = {k: _plain(v, f"frozen source {k}") for k, v in data.items()}
        if not all(isinstance(values.get(k), (str, type(None))) for k in ("kind", "fingerprint", "path", "prefix")):
            raise UserError("checkpoint: a frozen part's source holds non-text fields")
        return cls(**values)


def stored_path(path: str | Path) -> str:
    """A path as a checkpoint stores it: absolute (the run's working directory is not the reader's),
    except package files (``ldm:``), which stay relative to wherever the package is installed."""
    path = str(path)
    return path if path.startswith("ldm:") else str(Path(path).expanduser().resolve())
