"""Layers used more than once per forward pass, and embeddings sharing one weight: a sample's
gradient of such a layer is the sum over its uses, clipped once (tests/oracle.py is the
oracle: plain autograd on one sample sums the uses by itself)."""

from __future__ import annotations

import pytest
import torch
from oracle import assert_close_sums, fastdp_grad_sum, oracle_grad_sum, per_sample_loss
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

import fastdp

B, T, VOCAB, D = 4, 5, 11, 6


class Shared(nn.Module):
    """One embedding called on two id tensors (encoder / decoder inputs), and one Linear,
    LayerNorm and GroupNorm each applied at every depth (ALBERT-style sharing)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D, padding_idx=0)
        self.lin = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.group = nn.GroupNorm(2, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.emb(x) + self.emb(x.flip(1)[:, :3]).mean(1, keepdim=True)
        for _ in range(3):
            h = self.norm(torch.tanh(self.lin(h)) + h)
            h = self.group(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h.mean(1))


class TwoEmbeddings(nn.Module):
    """T5's layout: two embedding modules holding one weight (no head tied)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Embedding(VOCAB, D)
        self.decoder = nn.Embedding(VOCAB, D)
        self.decoder.weight = self.encoder.weight
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x).mean(1) * self.decoder(x[:, :2]).sum(1)))


def _data(model: nn.Module):
    torch.manual_seed(0)
    model = model.double().train()
    x = torch.randint(0, VOCAB, (B, T))
    with torch.no_grad():
        y = torch.randn_like(model(x)) * 3
    return model, x, y


MODES = ["flat", "none", "per_layer", "automatic"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("build", [Shared, TwoEmbeddings], ids=["reused", "shared_weight"])
def test_reused_layers_match_the_oracle(build, mode):
    model, x, y = _data(build())
    expected = oracle_grad_sum(model, x, y, mode, 0.5)
    assert_close_sums(fastdp_grad_sum(model, x, y, mode, 0.5), expected)


def test_reused_layers_micro_batched_and_with_views():
    model, x, y = _data(Shared())
    expected = oracle_grad_sum(model, x, y, "flat", 0.5)
    assert_close_sums(fastdp_grad_sum(model, x, y, "flat", 0.5, micro_batch=3), expected)
    views = x.repeat_interleave(2, 0)
    views[1::2] = torch.randint(0, VOCAB, (B, T))
    expected = oracle_grad_sum(model, views, y, "flat", 0.5, views=2)
    assert_close_sums(fastdp_grad_sum(model, views, y, "flat", 0.5, views=2), expected)


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.emb = nn.Embedding(VOCAB, D)
        self.lin = nn.Linear(D, D)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        h = self.lin(self.emb(x))
        h = checkpoint(lambda t: self.lin(torch.tanh(t)), h, use_reentrant=self.use_reentrant)
        return self.head(h.mean(1))


def test_reused_layer_inside_non_reentrant_checkpoint_matches_the_oracle():
    model, x, y = _data(Checkpointed(use_reentrant=False))
    expected = oracle_grad_sum(model, x, y, "flat", 0.5)
    assert_close_sums(fastdp_grad_sum(model, x, y, "flat", 0.5), expected)


def _private(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs):
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    options = dict(noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False, seed=0)
    options.update(kwargs)
    with pytest.warns(UserWarning):
        return fastdp.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, **options
        )


def test_reused_layer_inside_a_reentrant_checkpoint_is_refused():
    """The recomputed call cannot be matched to its forward pass: refused, not merged."""
    model, x, y = _data(Checkpointed(use_reentrant=True))
    model, optimizer, loader = _private(model, x, y)
    inputs, targets = next(iter(loader))
    loss = per_sample_loss(model(inputs), targets).sum()
    with pytest.raises(RuntimeError, match="reentrant activation checkpoint.*use_reentrant=False"):
        loss.backward()


def test_two_passes_of_a_reused_layer_with_one_backward_are_refused():
    """Rows of two forward passes are different samples: their calls are never merged."""
    model, x, y = _data(Shared())
    model, optimizer, loader = _private(model, x, y)
    inputs, targets = next(iter(loader))
    loss = per_sample_loss(model(inputs), targets) + per_sample_loss(model(inputs.flip(0)), targets)
    with pytest.raises(RuntimeError, match="second forward pass in one micro-batch"):
        loss.sum().backward()


class Repeated(nn.Module):
    """One Linear applied ``calls`` times to the same input and summed: a sample's gradient
    is ``calls`` times one call's gradient."""

    def __init__(self, calls: int):
        super().__init__()
        self.calls = calls
        self.lin = nn.Linear(8, 1, bias=False)

    def forward(self, x):
        return sum(self.lin(x) for _ in range(self.calls))


@pytest.mark.parametrize("mode", ["flat", "per_layer"])
def test_a_sample_through_a_reused_layer_moves_the_update_at_most_c(mode):
    """Attack: each call's gradient alone has norm <= C but the calls add up to 4 C (16 calls
    of a canary at 0.25 C each). Clipping the calls separately would release all of it; the
    merged clip keeps the canary's whole contribution at C (1 + 2^-10)."""
    torch.manual_seed(0)
    model = Repeated(16)
    x = torch.randn(1, 8)
    x = x / x.norm() * 0.25
    with torch.no_grad():
        model.lin.weight.zero_()
    y = torch.full((1, 1), -0.5)  # d loss / d output = 2 (0 - y) = 1 per call
    model, optimizer, loader = _private(model, x, y, clipping=mode)
    before = model.lin.weight.detach().clone()
    for inputs, targets in loader:
        per_sample_loss(model(inputs), targets).sum().backward()
        optimizer.step()
    moved = float((model.lin.weight.detach() - before).norm())
    assert moved <= 1.0 * (1 + 2.0**-10)
    assert moved > 0.99  # the canary is clipped to C, not dropped
