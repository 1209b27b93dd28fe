"""A checkpoint is data, never code: tensors and plain values, read with weights_only=True.

Before format v3 ``load_checkpoint`` called ``torch.load(weights_only=False)``: a file
carrying a pickled object whose ``__reduce__`` names a callable ran it at load (here it
would create a marker directory).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp
from fastdp.errors import CheckpointError


class _Payload:
    """Unpickled, this calls os.makedirs(marker): code from the file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _engine():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 2)), batch_size=4)
    engine = fastdp.PrivacyEngine(accountant="rdp")
    with pytest.warns(UserWarning, match="explicit seed"):
        m, opt, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            seed=3,
        )
    return engine, m, opt, loader


def _one_step(m, opt, loader):
    for x, y in loader:
        (m(x) - y).square().sum(1).mean().backward()
        opt.step()
        opt.zero_grad()
        if opt.last_step_updated:
            return


@pytest.mark.parametrize("where", ["extra", "run"])
def test_pickled_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path, where):
    engine, m, opt, loader = _engine()
    _one_step(m, opt, loader)
    path = tmp_path / "ck.pt"
    engine.save_checkpoint(path=path, module=m, optimizer=opt)
    payload = torch.load(path, weights_only=True)
    marker = tmp_path / "marker"
    payload[where]["evil"] = _Payload(str(marker))
    torch.save(payload, path)  # a file as an attacker would hand it over
    engine2, m2, opt2, _ = _engine()
    with pytest.raises(CheckpointError, match="not a tensor or plain value"):
        engine2.load_checkpoint(path=path, module=m2, optimizer=opt2)
    assert not marker.exists()  # before v3: the marker was created (the payload ran)
    assert opt2.logical_step == 0  # nothing restored


def test_save_refuses_what_is_not_plain(tmp_path):
    engine, m, opt, loader = _engine()
    with pytest.raises(CheckpointError, match=r"extra'\]\['mask'\] is a numpy.ndarray"):
        engine.save_checkpoint(path=tmp_path / "ck.pt", module=m, mask=np.zeros(3))
    assert not (tmp_path / "ck.pt").exists()


def test_round_trip_is_plain_and_restores(tmp_path):
    engine, m, opt, loader = _engine()
    _one_step(m, opt, loader)
    path = tmp_path / "ck.pt"
    engine.save_checkpoint(path=path, module=m, optimizer=opt, epoch=1, note="ok")
    payload = torch.load(path, weights_only=True)  # loads with torch's safe unpickler
    assert payload["format"] == "fastdp-checkpoint-v3"
    assert payload["accountant"]["history"] == [[1.0, 0.5, 1]]
    engine2, m2, opt2, _ = _engine()
    assert engine2.load_checkpoint(path=path, module=m2, optimizer=opt2) == {
        "epoch": 1,
        "note": "ok",
    }
    assert engine2.accountant.history == engine.accountant.history
    assert engine2.run.secret == engine.run.secret
    assert engine2.get_epsilon(1e-5) == engine.get_epsilon(1e-5)


def test_old_format_gets_a_clear_error(tmp_path):
    engine, m, opt, loader = _engine()
    path = tmp_path / "old.pt"
    engine.save_checkpoint(path=path, module=m, optimizer=opt)
    payload = torch.load(path, weights_only=True)
    payload["format"] = "fastdp-checkpoint-v2"
    torch.save(payload, path)
    engine2, m2, opt2, _ = _engine()
    with pytest.raises(CheckpointError, match="fastdp-checkpoint-v2 checkpoint, written by an"):
        engine2.load_checkpoint(path=path, module=m2, optimizer=opt2)
