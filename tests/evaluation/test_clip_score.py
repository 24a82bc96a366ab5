"""CLIP score with a tiny random open_clip model: the number, the preprocessing, loading, ranks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoints import save_safetensors
from ldm.errors import UserError
from ldm.evaluation.clip_score import CLIPScorer, clip_score, load_clip_scorer

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16, "layers": 1},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = ["a red circle", "a blue square in the top left", "a cat", "two dogs", "", "a green triangle", "x", "y"]


def tiny_scorer(seed: int = 0) -> CLIPScorer:
    torch.manual_seed(seed)
    model = open_clip.CLIP(**copy.deepcopy(TINY_CLIP))
    return CLIPScorer(model, open_clip.tokenizer.SimpleTokenizer(context_length=77), "tiny")


def _images(n: int = len(PROMPTS), size: tuple[int, int] = (40, 50), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=g)  # (B, 3, H, W)


def _batches(images: torch.Tensor, prompts: list[str], sizes: list[int]):
    start = 0
    for size in sizes:
        yield images[start : start + size], prompts[start : start + size]
        start += size


def test_clip_score_equals_a_manual_computation() -> None:
    scorer, images = tiny_scorer(), _images()
    with torch.no_grad():
        pixels = scorer.preprocess(images)  # (8, 3, 32, 32)
        image_emb = scorer.model.encode_image(pixels)
        text_emb = scorer.model.encode_text(open_clip.tokenizer.SimpleTokenizer(context_length=77)(PROMPTS))
        cosine = F.cosine_similarity(image_emb, text_emb, dim=-1)  # (8,)
    assert (cosine < 0).any() and (cosine > 0).any()  # the clamp at 0 matters for this model
    expected = 100 * cosine.clamp(min=0).mean().item()
    result = clip_score(_batches(images, PROMPTS, [3, 1, 4]), scorer, progress=False)
    assert result.num_pairs == 8
    assert result.score == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # numpy (B, H, W, 3) batches and other batch sizes give the same score
    as_numpy = images.permute(0, 2, 3, 1).numpy()
    again = clip_score([(as_numpy[:5], PROMPTS[:5]), (as_numpy[5:], PROMPTS[5:])], scorer, progress=False)
    assert again.score == pytest.approx(result.score, rel=1e-5)


def test_preprocessing_matches_open_clips_own_transform() -> None:
    """Float resize of the shorter side + centre crop + CLIP mean/std, as open_clip's PIL pipeline.

    PIL resizes uint8 images in two passes rounded to uint8, so the two agree to ~1-2 grey levels on
    smooth images (pure noise overshoots further, both are clipped differently)."""
    scorer = tiny_scorer()
    transform = open_clip.image_transform(32, is_train=False)  # bicubic, shortest side, centre crop
    g = torch.Generator().manual_seed(0)
    for size in ((40, 50), (64, 48), (200, 300), (32, 32)):
        coarse = torch.rand(2, 3, size[0] // 8 + 1, size[1] // 8 + 1, generator=g)
        images = (F.interpolate(coarse, size=size, mode="bilinear") * 255).round().to(torch.uint8)  # smooth
        theirs = torch.stack([transform(Image.fromarray(image.permute(1, 2, 0).numpy())) for image in images])
        ours = scorer.preprocess(images)
        assert ours.shape == theirs.shape == (2, 3, 32, 32)
        assert (ours - theirs).abs().max() < 0.05 and (ours - theirs).abs().mean() < 0.01  # 0.05 ~ 3.5 / 255 / std


def test_long_prompts_are_truncated_and_mismatched_pairs_refused() -> None:
    scorer = tiny_scorer()
    scores = scorer(_images(2), ["word " * 300, "a cat"])
    assert scores.shape == (2,) and bool(((scores >= 0) & (scores <= 100)).all())
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer(_images(2), ["a cat"])


def test_load_clip_scorer_from_a_config_json_and_a_weights_file(tmp_path: Path) -> None:
    reference = tiny_scorer(seed=5)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CLIP))
    state = {f"module.{k}": v for k, v in reference.model.state_dict().items()}  # as open_clip's DDP saves
    save_safetensors(state, tmp_path / "tiny.safetensors")
    loaded = load_clip_scorer(str(tmp_path / "tiny.json"), tmp_path / "tiny.safetensors")
    assert "sha256:" in loaded.description
    images = _images(4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, PROMPTS[:4]), reference(images, PROMPTS[:4]))

    wrong = {k: v for k, v in reference.model.state_dict().items() if not k.startswith("visual.")}
    save_safetensors(wrong, tmp_path / "text_only.safetensors")
    with pytest.raises(UserError, match="does not fit"):
        load_clip_scorer(str(tmp_path / "tiny.json"), tmp_path / "text_only.safetensors")
    with pytest.raises(FileNotFoundError):
        load_clip_scorer(str(tmp_path / "tiny.json"), tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="unknown open_clip model"):
        load_clip_scorer("ViT-Nonexistent-1", None)


def _rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        images = _images()
        mine = list(range(rank, len(PROMPTS), world_size))
        result = clip_score([(images[mine], [PROMPTS[i] for i in mine])], tiny_scorer(), progress=False)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps([result.score, result.num_pairs]))
    finally:
        dist.destroy_process_group()


def test_ranks_sum_their_pairs_into_the_single_process_score(tmp_path: Path) -> None:
    mp.start_processes(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    single = clip_score([(_images(), PROMPTS)], tiny_scorer(), progress=False)
    for rank in (0, 1):
        score, count = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert count == 8 and score == pytest.approx(single.score, rel=1e-5)
