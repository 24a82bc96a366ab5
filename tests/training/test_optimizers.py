import copy

import pytest
import torch
from torch import nn

from ldm.training.optimizers import MuonAdamW, orthogonalize


def singular_values(matrices: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrices.double())


@pytest.mark.parametrize("shape", [(3, 16, 48), (3, 48, 16), (2, 32, 32)])
def test_orthogonalize_flattens_the_spectrum_of_every_matrix(shape):
    updates = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    updates[0] *= 1e3  # each matrix is normalised on its own
    values = singular_values(orthogonalize(updates))
    # the quintic iteration trades exactness for speed: singular values land in ~[0.7, 1.2], not at 1
    # (a square Gaussian matrix's smallest ones, ~1e-3 of its largest, rise less far in five steps)
    assert values.min() > 0.3 and values.max() < 1.3
    assert 0.7 < values.median() < 1.2
    assert singular_values(updates).max() / singular_values(updates).min() > 10  # it did flatten something


def test_orthogonalize_keeps_the_row_and_column_spaces():
    generator = torch.Generator().manual_seed(1)
    left, right = torch.randn(24, 3, generator=generator), torch.randn(3, 40, generator=generator)
    update = left @ right  # rank 3
    result = orthogonalize(update)
    assert torch.linalg.matrix_rank(result, atol=1e-3) == 3
    column_projector = left @ torch.linalg.pinv(left)
    assert torch.allclose(column_projector @ result, result, atol=1e-4)


def test_orthogonalize_of_an_orthogonal_matrix_is_close_to_it():
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(2)))
    result = orthogonalize(q)
    # a scaled copy of q: every singular value maps to the same value of the iteration
    cosine = (result * q).sum() / (result.norm() * q.norm())
    assert cosine > 0.9999


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 16, 5)
    )


def train(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, 4, 4, generator=generator)
        y = 2 * x.flatten(1)[:, :5]  # a target the net can learn
        loss = (net(x) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_matrices_and_filters_get_muon_and_the_rest_adamw():
    net = tiny_net()
    optimizer = MuonAdamW(net.parameters(), lr=1e-2)
    muon, adamw = optimizer.param_groups
    assert [tuple(p.shape) for p in muon["params"]] == [(8, 3, 3, 3), (5, 128)]
    assert [tuple(p.shape) for p in adamw["params"]] == [(8,), (8,), (8,), (5,)]


def test_flat_parameters_alone_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="FSDP or DeepSpeed"):
        MuonAdamW([nn.Parameter(torch.zeros(10))])


def test_a_net_of_matrices_only_needs_no_adamw():
    net = nn.Linear(4, 3, bias=False)
    start = net.weight.detach().clone()
    optimizer = MuonAdamW(net.parameters(), lr=1e-2)
    assert [len(group["params"]) for group in optimizer.param_groups] == [1]  # Muon's group alone, no AdamW group
    net.weight.grad = torch.ones_like(net.weight)
    optimizer.step()
    assert not torch.equal(net.weight, start)  # Muon moved it
    state = copy.deepcopy(optimizer.state_dict())
    optimizer.load_state_dict(state)  # a checkpoint round trip keeps the momentum
    assert torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"])


def test_vectors_follow_torch_adamw_exactly():
    net, reference = tiny_net(), tiny_net()
    optimizer = MuonAdamW(net.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    vectors = [p for p in reference.parameters() if p.ndim < 2]
    matrices = [p for p in reference.parameters() if p.ndim >= 2]
    adamw = torch.optim.AdamW(vectors, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    for p in matrices:
        p.requires_grad_(False)  # the reference moves the vectors only; so must the comparison
    for p in net.parameters():
        p.requires_grad_(p.ndim < 2)
    train(net, optimizer, 3)
    train(reference, adamw, 3)
    for ours, theirs in zip(net.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)


def test_a_filter_moves_by_its_orthogonalised_momentum_at_adamw_scale():
    conv = nn.Conv2d(4, 6, 3)
    start = conv.weight.detach().clone()
    optimizer = MuonAdamW(conv.parameters(), lr=0.1, weight_decay=0.0, nesterov=False)
    grad = torch.randn_like(conv.weight)
    conv.weight.grad = grad.clone()
    conv.bias.grad = torch.zeros_like(conv.bias)
    optimizer.step()
    momentum = 0.05 * grad.reshape(6, -1)  # the first step's buffer: (1 - 0.95) g
    expected = start - 0.1 * 0.2 * 36**0.5 * orthogonalize(momentum).view_as(start)
    assert torch.allclose(conv.weight, expected, atol=1e-6)
    rms = (conv.weight - start).pow(2).mean().sqrt() / 0.1
    assert 0.12 < rms < 0.25  # the RMS of an AdamW step, whatever the gradient's size


def test_scheduler_scales_both_groups():
    net = tiny_net()
    optimizer = MuonAdamW(net.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert [group["lr"] for group in optimizer.param_groups] == [5e-3, 5e-3]
    train(net, optimizer, 1)
    scheduler.step()
    assert optimizer._adamw.param_groups[0]["lr"] == 5e-3


def test_state_dict_resumes_exactly():
    net = tiny_net()
    optimizer = MuonAdamW(net.parameters(), lr=1e-2)
    train(net, optimizer, 3)
    saved_net, saved_state = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())
    straight = train(net, optimizer, 3, seed=1)

    resumed_net = tiny_net()
    resumed_net.load_state_dict(saved_net)
    resumed = MuonAdamW(resumed_net.parameters(), lr=1e-2)
    resumed.load_state_dict(saved_state)
    assert train(resumed_net, resumed, 3, seed=1) == straight
    for a, b in zip(net.parameters(), resumed_net.parameters()):
        assert torch.equal(a, b)


def test_fits_a_regression_faster_than_it_starts():
    net = tiny_net()
    losses = train(net, MuonAdamW(net.parameters(), lr=3e-2), 60)
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
