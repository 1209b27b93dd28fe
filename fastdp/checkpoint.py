"""Checkpoints of a private run: model, optimizer, accountant history and step counters.

The noise and the Poisson sample sets are pure functions of (secret, logical step), so the
secret and the step counter are the whole random state: a resumed run draws exactly what the
uninterrupted one would. The file also records the run's privacy facts (clipping mode, C and
the per-layer thresholds, sigma, sample rate, dataset size, sampling, loss reduction, world
size, accountant): a checkpoint only resumes into an engine made private with the same ones,
or the accountant would report an epsilon for steps it did not take (e.g. unclipped
Noisy-SGD steps resumed as flat clipping). The secret makes the file as sensitive as the
data. Resuming replays the noise of the steps after the checkpoint: resume only from a run's
latest checkpoint (an engine that already stepped refuses to load one). Files are written to
a temporary name in the same directory, fsynced and renamed over the target, so a crash
mid-write leaves the previous checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

FORMAT = "fastdp-checkpoint-v2"


def save(engine, *, path, module: nn.Module, optimizer=None, **extra) -> None:
    optimizer = optimizer if optimizer is not None else engine.optimizer
    if optimizer is not None and optimizer.mid_logical_batch():
        raise RuntimeError(
            "cannot checkpoint in the middle of a logical batch: its clipped sums and "
            "micro-batch position would be lost. Save right after a step() that updated the "
            "parameters (optimizer.last_step_updated is True)."
        )
    run = engine.run
    if run is None:
        raise RuntimeError("save_checkpoint needs an engine that made a model private")
    payload = {
        "format": FORMAT,
        "module": module.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "run": run.facts(),
        "logical_step": run.logical_step,
        "secret": run.secret,
        "accountant": {"name": engine.accountant_name, "history": list(engine.accountant.history)},
        "extra": extra,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(engine, *, path, module: nn.Module, optimizer=None) -> dict:
    optimizer = optimizer if optimizer is not None else engine.optimizer
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({type(err).__name__}: {err}); "
            "nothing was restored. Load an earlier checkpoint."
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a fastdp checkpoint ({FORMAT})")
    run = engine.run
    if run is None:
        raise RuntimeError("load_checkpoint needs an engine that made a model private first")
    _check_same_run(payload["run"], run.facts(), path)
    if run.logical_step or engine.accountant.history:
        raise RuntimeError(
            f"this engine has already taken {run.logical_step} logical step(s): loading "
            f"{str(path)!r} into it would drop them from the accounting and replay the noise "
            "of the steps after the checkpoint (a rollback that then diverges releases two "
            "updates whose difference has no noise). Load checkpoints into a freshly made "
            "private engine, and resume only from the latest checkpoint of a run."
        )
    module.load_state_dict(payload["module"])
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    run.secret = payload["secret"]
    run.logical_step = payload["logical_step"]
    if optimizer is not None:
        optimizer.discard_logical_batch()
    engine.accountant.history = [tuple(h) for h in payload["accountant"]["history"]]
    return payload["extra"]


def _check_same_run(saved: dict, current: dict, path) -> None:
    """Refuse to resume into an engine whose privacy facts differ, naming the field."""
    for field, value in saved.items():
        now = current.get(field)
        same = value == now
        if isinstance(value, float) and isinstance(now, float):
            same = value == now or abs(value - now) <= 1e-12 * max(abs(value), abs(now))
        if not same:
            raise ValueError(
                f"checkpoint {str(path)!r} was written by a run with {field}={value!r}, but this "
                f"engine has {field}={now!r}: resuming would account its steps under the wrong "
                f"assumptions. Call make_private with {field}={value!r} (and the same other "
                "settings) before load_checkpoint."
            )
