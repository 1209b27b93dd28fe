"""The tape's guards: misuse that would break the privacy guarantee is refused, not
silently turned into a wrong (or doubly counted) update."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import per_sample_loss
from test_engine import _make, _mlp, _private
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp


# ---- misuse that would break the guarantee -----------------------------------------------
def test_input_gradient_pass_is_not_recorded():
    model = _mlp()
    (engine, m, opt, loader), (x, y) = _private(model)
    xb = x[:4].clone().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(per_sample_loss(m(xb), y[:4]).mean(), xb)
    assert grad_x.shape == xb.shape and not opt.grad_sums  # adversarial-style pass: nothing
    per_sample_loss(m(x[:4]), y[:4]).mean().backward()
    assert opt.grad_sums


def test_second_backward_through_retained_graph_is_refused():
    model = _mlp()
    (engine, m, opt, loader), (x, y) = _private(model)
    loss = per_sample_loss(m(x[:4]), y[:4]).mean()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward pass went through module"):
        loss.backward()


def test_reiterating_inside_a_logical_batch_is_refused():
    model = _mlp()
    (engine, m, opt, loader), (x, y) = _private(model, batch=16, max_physical_batch_size=4)
    for xb, yb in loader:
        per_sample_loss(m(xb), yb).mean().backward()
        opt.step()
        break
    with pytest.raises(RuntimeError, match="discard_logical_batch"):
        next(iter(loader))
    opt.discard_logical_batch()
    assert next(iter(loader))[0].shape[0] == 4


def test_flattened_batch_dimension_is_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):  # (B, 2, 3) -> (2B, 3): per-token "samples"
            return self.lin(x.reshape(-1, 3)).reshape(x.shape[0], -1)

    data = DataLoader(TensorDataset(torch.randn(8, 2, 3), torch.randn(8, 4)), batch_size=4)
    model = Flat()
    m, opt, loader = fastdp.PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=data,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    xb, yb = next(iter(loader))
    with pytest.raises(
        ValueError, match=r"'lin' \(Linear\) (saw a leading dimension of 8|is not batch-first)"
    ):
        m(xb)


def test_parameter_used_outside_its_layer_is_refused():
    class Side(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 2)

        def forward(self, x):
            return self.lin(x) + F.linear(x, self.lin.weight)

    model = Side()
    (engine, m, opt, loader), (x, y) = _private(model)
    per_sample_loss(m(x[:4]), y[:4]).mean().backward()
    with pytest.raises(RuntimeError, match="lin.weight has an ordinary, unclipped gradient"):
        opt.step()


def test_privacy_settings_are_read_only_and_samplers_refused():
    model = _mlp()
    (engine, m, opt, loader), (x, y) = _private(model)
    with pytest.raises(AttributeError, match="read-only"):
        opt.max_grad_norm = 0.01
    with pytest.raises(AttributeError, match="read-only"):
        opt.noise_multiplier = 0.1
    subset = torch.utils.data.SubsetRandomSampler(range(4))
    data = DataLoader(TensorDataset(x, y), batch_size=4, sampler=subset)
    other = _mlp()
    with pytest.raises(ValueError, match="SubsetRandomSampler"):
        fastdp.PrivacyEngine().make_private(
            module=other,
            optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
            data_loader=data,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


def test_embedding_max_norm_refused():
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4, max_norm=1.0)

    with pytest.raises(ValueError, match=r"'emb' \(.*Embedding\) has max_norm"):
        _make(Emb())


def test_poisson_step_divides_by_expected_not_realised_batch():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    reference = nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    before = model.weight.detach().clone()
    x, y = torch.randn(50, 3), torch.randn(50, 2)
    m, opt, loader = fastdp.PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=10),
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        seed=3,
    )
    xb, yb = next(iter(loader))
    assert len(xb) != 10  # the realised Poisson batch differs from q * N = 10 here
    per_sample_loss(m(xb), yb).mean().backward()
    opt.step()
    per_sample_loss(reference(xb), yb).sum().backward()  # no clipping at C = 1e6
    assert torch.allclose(before - model.weight.detach(), reference.weight.grad / 10, atol=1e-6)


def test_zero_filled_gradients_are_not_mistaken_for_plain_ones():
    model = _mlp()
    (engine, m, opt, loader), (x, y) = _private(model)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)  # what zero_grad(set_to_none=False) leaves behind
    per_sample_loss(m(x[:4]), y[:4]).mean().backward()
    opt.step()
    assert opt.last_step_updated


def test_overflowing_sum_is_refused_not_applied():
    model = _mlp()
    (engine, m, opt, loader), (x, y) = _private(model, clipping="flat")
    per_sample_loss(m(x[:4]), y[:4]).mean().backward()
    before = [p.detach().clone() for p in m.parameters()]
    next(iter(opt.grad_sums.values())).fill_(3e38).mul_(10)  # finite inputs, overflowed sum
    with pytest.raises(RuntimeError, match="not finite"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, m.parameters()))
    opt.discard_logical_batch()
    per_sample_loss(m(x[:4]), y[:4]).mean().backward()
    opt.step()
    assert opt.last_step_updated
