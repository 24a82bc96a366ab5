"""The noise-aware classifier: heads, time conditioning, gradients for guidance, its recorded arguments."""

import pytest
import torch

from ldm.models.classifier import NoisyClassifier

HEADS = {"colour": 7, "shape": 3, "position": 5}


def _classifier(**kwargs):
    torch.manual_seed(0)
    classifier = NoisyClassifier(HEADS, model_channels=16, norm_groups=4, **kwargs)
    for p in classifier.parameters():  # the ResBlocks are zero-initialised: make the time path visible
        torch.nn.init.normal_(p, std=0.1)
    return classifier


def test_one_logit_vector_per_head_at_any_latent_size():
    classifier = _classifier()
    for size in (16, 8):
        logits = classifier(torch.randn(3, 4, size, size), torch.tensor([0, 500, 999]))
        assert {k: tuple(v.shape) for k, v in logits.items()} == {k: (3, n) for k, n in HEADS.items()}


def test_logits_depend_on_the_timestep_and_on_where_things_are():
    classifier = _classifier()
    x = torch.randn(1, 4, 16, 16)
    early, late = classifier(x, torch.tensor([10])), classifier(x, torch.tensor([900]))
    assert not torch.allclose(early["colour"], late["colour"])
    # a latent and its mirror image: with a grid pooled head, position is not averaged away
    mirrored = classifier(x.flip(-1), torch.tensor([10]))
    assert not torch.allclose(early["position"], mirrored["position"])


def test_gradient_reaches_the_input():
    classifier = _classifier()
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    classifier(x, torch.tensor([100, 200]))["shape"].logsumexp(-1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_config_rebuilds_the_same_architecture():
    classifier = _classifier(channel_multipliers=(1, 2, 2), pool_size=2)
    rebuilt = NoisyClassifier(HEADS, **classifier.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in classifier.state_dict().items()
    }
    assert classifier.config["channel_multipliers"] == [1, 2, 2]


def test_heads_need_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        NoisyClassifier({"colour": 1})
