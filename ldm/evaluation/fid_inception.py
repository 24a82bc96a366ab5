"""The FID network: pytorch-fid's Inception-v3 on a local weights file, uint8 images -> pool3 features.

The network, its resizing and its input scaling are pytorch-fid's (Seitzer, "pytorch-fid: FID Score
for PyTorch", github.com/mseitzer/pytorch-fid), the port of the reference TensorFlow code of Heusel
et al. 2017 (github.com/bioinf-jku/TTUR) that published FIDs are commonly computed with: TensorFlow's
Inception-v3 of 2015-12-05 (``pt_inception-2015-12-05-6726825d.pth``, ``FID_WEIGHTS_URL``), its
2048-d final average pool ("pool3"), a bilinear resize to 299x299 inside the network (no
antialiasing) and [0, 1] -> [-1, 1]. Images reach it as pytorch-fid's ``fid_score`` hands them over:
uint8 RGB -> float32 / 255 (torchvision's ``ToTensor``). With the same weights our features equal
pytorch-fid's (tests/evaluation/test_fid_inception.py).

What is ours: pytorch-fid's constructor downloads its weights; here they come from a local file
(``.pth`` read with ``weights_only=True``, or ``.safetensors``) and the constructor's one download
call is answered with them (``build_inception_v3``), so nothing is fetched. ``variant="torchvision"``
runs pytorch-fid's other mode, torchvision's ImageNet Inception-v3 (``inception_v3_google-0cc3c7bd.pth``):
a non-standard "FID-torchvision" that does not compare with published FIDs.
"""

from __future__ import annotations

import threading
from pathlib import Path
from unittest import mock

import pytorch_fid
import pytorch_fid.inception as pytorch_fid_inception
import torch
from pytorch_fid.inception import InceptionV3
from torch import Tensor, nn
from torchvision.models import Inception3, inception_v3

from ldm.checkpoints import load_state_dict_file
from ldm.errors import UserError
from ldm.evaluation.file_identity import file_fingerprint

FID_WEIGHTS_URL = pytorch_fid_inception.FID_WEIGHTS_URL  # the standard weights, to download by hand
INCEPTION_VARIANTS = {"fid": 1008, "torchvision": 1000}  # variant -> classes of its final layer
POOL3 = InceptionV3.BLOCK_INDEX_BY_DIM[2048]  # the block ending in the 2048-d average pool
_CONSTRUCTING = threading.Lock()  # the download function is replaced module-wide while one is built


def _torchvision_graph(num_classes: int) -> Inception3:
    """torchvision's Inception-v3 graph without weights, aux head or init (pytorch-fid's starting point)."""
    return inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=num_classes)


def build_inception_v3(variant: str, state_dict: dict[str, Tensor]) -> InceptionV3:
    """pytorch-fid's ``InceptionV3`` up to pool3, in eval mode, holding ``state_dict``; downloads nothing.

    ``"fid"``: pytorch-fid builds its FID graph (1008 classes, TensorFlow's pooling) and loads it
    from ``load_state_dict_from_url(FID_WEIGHTS_URL)``, which answers with ``state_dict``.
    ``"torchvision"``: pytorch-fid asks ``_inception_v3(weights="DEFAULT")`` for torchvision's
    pretrained network, which is built here with ``state_dict`` instead. Keys are torchvision's in
    both; a state dict that does not fit raises ``RuntimeError`` from ``load_state_dict``.
    """
    if variant not in INCEPTION_VARIANTS:
        raise ValueError(f"Inception variant must be one of {sorted(INCEPTION_VARIANTS)}, got {variant!r}")

    def fid_weights(url: str, *args, **kwargs) -> dict[str, Tensor]:
        if url != FID_WEIGHTS_URL:
            raise RuntimeError(f"pytorch-fid asked for unexpected weights {url}")
        return state_dict

    def torchvision_network(*args, **kwargs) -> Inception3:
        net = _torchvision_graph(INCEPTION_VARIANTS["torchvision"])
        net.load_state_dict(state_dict)
        return net

    if variant == "fid":
        local_weights = mock.patch.object(pytorch_fid_inception, "load_state_dict_from_url", fid_weights)
    else:
        local_weights = mock.patch.object(pytorch_fid_inception, "_inception_v3", torchvision_network)
    with _CONSTRUCTING, local_weights:
        net = InceptionV3([POOL3], use_fid_inception=variant == "fid")
    return net.requires_grad_(False).eval()


def random_inception_weights(variant: str = "fid", seed: int = 0) -> dict[str, Tensor]:
    """A seeded random state dict for ``variant``'s graph: tests and offline smoke runs only.

    Convolutions get He-normal weights (He et al. 2015), which keep the activations' scale through
    the network: pool3 features are O(0.1) and differ between images, where PyTorch's default init
    shrinks them to ~1e-8 and every FID to ~0.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _torchvision_graph(INCEPTION_VARIANTS[variant])
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net.state_dict()


def read_inception_weights(path: str | Path, variant: str) -> dict[str, Tensor]:
    """The state dict in ``path`` (``.pth``/``.safetensors``), checked to be ``variant``'s Inception-v3."""
    state = load_state_dict_file(path)  # FileNotFoundError names the path
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}  # torchvision's files have one
    classes = state["fc.weight"].shape[0] if "fc.weight" in state else None
    wanted = INCEPTION_VARIANTS[variant]
    if classes is not None and classes != wanted:
        other = next((name for name, n in INCEPTION_VARIANTS.items() if n == classes), None)
        hint = f" (these look like variant {other!r}: use --fid-variant {other})" if other else ""
        raise UserError(f"{path}: an Inception-v3 with {classes} classes, variant {variant!r} needs {wanted}{hint}")
    return state


class InceptionV3Features(nn.Module):
    """FID's Inception-v3 pool3 features: uint8 images (B, 3, H, W) of any size -> (B, 2048) float32.

    weights: a local ``pt_inception-2015-12-05-6726825d.pth`` (variant ``"fid"``, the standard) or
        torchvision's ``inception_v3_google-0cc3c7bd.pth`` (variant ``"torchvision"``); ``.pth`` or
        ``.safetensors``. None: ``random_inception_weights(variant, init_seed)``, for tests, and the
        description says so.
    """

    feature_dim = 2048

    def __init__(self, weights: str | Path | None, variant: str = "fid", init_seed: int = 0):
        super().__init__()
        if variant not in INCEPTION_VARIANTS:
            raise ValueError(f"Inception variant must be one of {sorted(INCEPTION_VARIANTS)}, got {variant!r}")
        if weights is None:
            state, identity = random_inception_weights(variant, init_seed), f"random-init-seed{init_seed}"
        else:
            state = read_inception_weights(weights, variant)
            identity = "sha256:" + file_fingerprint(weights)["sha256_first_64MiB"][:16]
        try:
            self.net = build_inception_v3(variant, state)
        except RuntimeError as error:  # load_state_dict's missing/unexpected keys, shape mismatches
            lines = str(error).splitlines()
            first = lines[min(1, len(lines) - 1)].strip()  # the first missing/unexpected key or mismatch
            raise UserError(f"{weights} does not hold Inception-v3 weights ({first})") from None
        self.variant = variant
        # names network, weights and preprocessing (pytorch-fid's, by version): caches from others are refused
        self.description = f"inception_v3-{variant} {identity} pytorch-fid-{pytorch_fid.__version__} pool3"

    def forward(self, images: Tensor) -> Tensor:
        device = self.net.blocks[0][0].conv.weight.device
        # as pytorch-fid's fid_score: ToTensor's contiguous (B, 3, H, W) float32 in [0, 1]
        x = images.to(device).contiguous().to(torch.float32) / 255
        return self.net(x)[0].flatten(1)  # resized to 299x299 and scaled to [-1, 1] inside; (B, 2048)
