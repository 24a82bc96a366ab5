"""CLIP score: how well images match their prompts, by an open_clip model.

CLIP score = 100 * mean over (image, prompt) pairs of max(cos(E_I(image), E_T(prompt)), 0), the
CLIPScore of Hessel et al. (2021, "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning") with the scale 100 that text-to-image papers (and torchmetrics) use instead of 2.5.

Weights come from a local file (nothing downloads): an open_clip state dict, e.g. the
``open_clip_model.safetensors`` of ``laion/CLIP-ViT-B-32-laion2B-s34B-b79K`` (``--clip-model
ViT-B-32``) or of ``timm/vit_large_patch14_clip_224.openai`` (OpenAI's ViT-L/14, the usual choice
for text-to-image papers: ``--clip-model ViT-L-14-quickgelu``; OpenAI's weights need QuickGELU).
Images are preprocessed as open_clip's evaluation transform does, in float: bicubic antialiased
resize of the shorter side to the model's image size, centre crop, the model's mean/std (OpenAI's
by default). Prompts longer than the context (77 tokens) are truncated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
import torchvision.transforms.v2.functional as TF
from open_clip.transform import PreprocessCfg
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from ldm.checkpoints import load_state_dict_file
from ldm.errors import UserError
from ldm.evaluation.file_identity import file_fingerprint
from ldm.evaluation.image_sets import ImageBatch, as_image_tensor


@dataclass(frozen=True)
class CLIPScoreResult:
    score: float  # 100 * mean of max(cos, 0), in [0, 100]
    num_pairs: int


class CLIPScorer(nn.Module):
    """An open_clip model scoring (image, prompt) pairs: uint8 (B, 3, H, W) + B prompts -> (B,) scores.

    model: an open_clip ``CLIP`` (or ``CustomTextCLIP``) with ``encode_image``/``encode_text``;
    tokenizer: prompts -> token ids (B, L), e.g. ``open_clip.get_tokenizer(name)``;
    description: names the model and weights (recorded in metrics.json).
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], Tensor], description: str = "open_clip"):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.description = description
        config = {**asdict(PreprocessCfg()), **open_clip.get_model_preprocess_cfg(model)}
        size = config["size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer("mean", torch.tensor(config["mean"]).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> normalised float (B, 3, *image_size): resize shorter side, centre crop."""
        x = images.to(self.device, torch.float32) / 255  # (B, 3, H, W) in [0, 1]
        shorter = min(self.image_size)
        x = TF.resize(x, [shorter], interpolation=InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, list(self.image_size)).clamp(0, 1)  # (B, 3, h, w)
        return (x - self.mean) / self.std

    def embed_images(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> unit image embeddings (B, E)."""
        return self.model.encode_image(self.preprocess(images), normalize=True)

    def embed_prompts(self, prompts: Sequence[str]) -> Tensor:
        """B prompts -> unit text embeddings (B, E)."""
        tokens = self.tokenizer(list(prompts)).to(self.device)  # (B, L)
        return self.model.encode_text(tokens, normalize=True)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(B,) per-pair scores 100 * max(cos, 0)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        cosine = (self.embed_images(images) * self.embed_prompts(prompts)).sum(dim=-1)  # (B,)
        return 100 * cosine.clamp(min=0)


def load_clip_scorer(model_name: str, weights: str | Path | None, init_seed: int = 0) -> CLIPScorer:
    """A ``CLIPScorer`` built offline: ``model_name`` is an open_clip config name (``ViT-B-32``,
    ``ViT-L-14-quickgelu``, ...) or the path of an open_clip model config JSON (``embed_dim``,
    ``vision_cfg``, ``text_cfg``); ``weights`` a local state dict file. None keeps a seeded random
    init (tests only)."""
    config_path = Path(model_name).expanduser()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if config_path.suffix == ".json":
            if not config_path.is_file():
                raise FileNotFoundError(f"CLIP model config not found: {config_path}")
            config = json.loads(config_path.read_text())
            model_class = open_clip.CustomTextCLIP if config.pop("custom_text", False) else open_clip.CLIP
            preprocess = config.pop("preprocess_cfg", None)
            model = model_class(**config)
            if preprocess:
                open_clip.set_model_preprocess_cfg(model, {**asdict(PreprocessCfg()), **preprocess})
            tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
        else:
            if open_clip.get_model_config(model_name) is None:
                raise UserError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
            model = open_clip.create_model(model_name, pretrained=None)
            tokenizer = open_clip.get_tokenizer(model_name)
    identity = f"random-init-seed{init_seed}"
    if weights is not None:
        state = load_state_dict_file(weights)  # FileNotFoundError names the path
        state = {k.removeprefix("module."): v for k, v in state.items()}  # open_clip's DDP training files
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            first_line = str(error).splitlines()[0]
            raise UserError(f"{weights} does not fit open_clip model {model_name} ({first_line})") from error
        identity = "sha256:" + file_fingerprint(weights)["sha256_first_64MiB"][:16]
    return CLIPScorer(model, tokenizer, description=f"open_clip {model_name} {identity}")


@torch.no_grad()
def clip_score(
    pairs: Iterable[tuple[ImageBatch, Sequence[str]]],
    scorer: CLIPScorer,
    device: torch.device | str = "cpu",
    total: int | None = None,
    progress: bool = True,
) -> CLIPScoreResult:
    """CLIP score of (uint8 images, prompts) batches; under ``torch.distributed`` each rank passes its
    own pairs and the sums are all-reduced, so every rank returns the score of all pairs."""
    scorer.to(device)
    total_score = torch.zeros((), dtype=torch.float64, device=scorer.device)
    count = 0
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    with tqdm(total=total, desc="CLIP score", unit="img", disable=not progress or rank != 0) as bar:
        for images, prompts in pairs:
            scores = scorer(as_image_tensor(images), prompts)  # (B,)
            total_score += scores.double().sum()
            count += len(scores)
            bar.update(len(scores))
    sums = torch.stack([total_score, torch.tensor(float(count), dtype=torch.float64, device=total_score.device)])
    if dist.is_available() and dist.is_initialized():
        on_gpu = dist.get_backend() == "nccl"
        sums = sums.to(torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
        dist.all_reduce(sums)
    total_score, count = float(sums[0]), int(sums[1])
    if count == 0:
        raise UserError("no (image, prompt) pairs to score")
    return CLIPScoreResult(score=total_score / count, num_pairs=count)
