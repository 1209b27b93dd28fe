"""Checkpoints: exact resumption, atomic writes, refusals."""

from __future__ import annotations

import pytest
import torch
from oracle import per_sample_loss
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp


def _setup(seed=11, optimizer="adamw"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(120, 4), torch.randn(120, 2)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = fastdp.PrivacyEngine(accountant="rdp")
    m, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=12),
        noise_multiplier=0.8,
        max_grad_norm=1.0,
        max_physical_batch_size=5,
        seed=seed,
    )
    return engine, m, opt, loader


def _train(m, opt, loader, logical_steps):
    done = 0
    while done < logical_steps:
        for xb, yb in loader:
            per_sample_loss(m(xb), yb).mean().backward()
            opt.step()
            opt.zero_grad()
            if opt.last_step_updated:
                done += 1
                if done == logical_steps:
                    return


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_resume_is_bit_identical(tmp_path, kind):
    engine, m, opt, loader = _setup(optimizer=kind)
    _train(m, opt, loader, 17)  # crosses an epoch boundary (10 logical steps per epoch)
    reference = [p.detach().clone() for p in m.parameters()]
    eps = engine.get_epsilon(1e-5)

    engine, m, opt, loader = _setup(optimizer=kind)
    _train(m, opt, loader, 7)
    engine.save_checkpoint(path=tmp_path / "ck.pt", module=m, optimizer=opt)

    engine2, m2, opt2, loader2 = _setup(seed=999, optimizer=kind)  # the checkpoint's seed wins
    engine2.load_checkpoint(path=tmp_path / "ck.pt", module=m2, optimizer=opt2)
    assert opt2.logical_step == 7
    _train(m2, opt2, loader2, 10)
    for a, b in zip(reference, m2.parameters()):
        assert torch.equal(a, b)
    assert engine2.get_epsilon(1e-5) == eps


def test_mid_logical_batch_is_refused(tmp_path):
    engine, m, opt, loader = _setup()
    xb, yb = next(iter(loader))
    per_sample_loss(m(xb), yb).mean().backward()
    with pytest.raises(RuntimeError, match="middle of a logical batch"):
        engine.save_checkpoint(path=tmp_path / "ck.pt", module=m, optimizer=opt)
    assert not (tmp_path / "ck.pt").exists()


def test_truncated_checkpoint_refused_previous_still_loads(tmp_path):
    engine, m, opt, loader = _setup()
    _train(m, opt, loader, 2)
    good = tmp_path / "good.pt"
    engine.save_checkpoint(path=good, module=m, optimizer=opt)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    engine2, m2, opt2, _ = _setup()
    with pytest.raises(ValueError, match="corrupt or truncated"):
        engine2.load_checkpoint(path=bad, module=m2, optimizer=opt2)
    engine2.load_checkpoint(path=good, module=m2, optimizer=opt2)
    assert opt2.logical_step == 2


def test_failed_write_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    engine, m, opt, loader = _setup()
    _train(m, opt, loader, 1)
    path = tmp_path / "ck.pt"
    engine.save_checkpoint(path=path, module=m, optimizer=opt)
    content = path.read_bytes()
    _train(m, opt, loader, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        engine.save_checkpoint(path=path, module=m, optimizer=opt)
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind
