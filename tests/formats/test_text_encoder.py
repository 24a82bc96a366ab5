"""ldm.formats.text_encoder: the text encoder's weights from files of any layout (what
``model.conditioner.pretrained`` loads); the HF layout round trip is in test_clip_layouts.py."""

import pytest
import torch

from ldm.checkpoints import save_safetensors
from ldm.errors import UserError
from ldm.formats.text_encoder import open_clip_text_encoder
from ldm.models.conditioners import OpenCLIPTextEncoder

TINY = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=3)
PROMPTS = ["a red circle in the top left", "a blue square in the center", ""]


def tiny(**kwargs) -> OpenCLIPTextEncoder:
    return OpenCLIPTextEncoder(model_name=None, text_cfg=TINY, **kwargs).eval()


def test_pretrained_weights_from_local_files(tmp_path):
    source = tiny(init_seed=7)
    full_model_state = {f"{k}": v for k, v in source.model.state_dict().items()}
    full_model_state["visual.conv1.weight"] = torch.zeros(1)  # a full CLIP file also holds the image tower
    full_model_state["logit_scale"] = torch.ones(())
    path = tmp_path / "clip.safetensors"
    save_safetensors(full_model_state, path)
    loaded = open_clip_text_encoder(model_name=None, text_cfg=TINY, pretrained=str(path))
    with torch.no_grad():
        assert torch.equal(loaded(PROMPTS), source(PROMPTS))
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.model.state_dict().items()}}, tmp_path / "clip.pt")
    with torch.no_grad():
        assert torch.equal(
            open_clip_text_encoder(model_name=None, text_cfg=TINY, pretrained=str(tmp_path / "clip.pt"))(PROMPTS),
            source(PROMPTS),
        )


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found: .*nope.bin"):
        open_clip_text_encoder(model_name=None, text_cfg=TINY, pretrained=str(tmp_path / "nope.bin"))
    with pytest.raises(UserError, match="neither a local file nor a cached open_clip tag"):
        open_clip_text_encoder(model_name="ViT-B-32", pretrained="no_such_tag")
