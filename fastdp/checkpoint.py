"""Checkpoints of a private run: model, optimizer, accountant history and step counters.

The noise and the Poisson sample sets are pure functions of (seed, logical step), so the seed
and the step counter are the whole random state: a resumed run draws exactly what the
uninterrupted one would. Files are written to a temporary name in the same directory,
fsynced and renamed over the target, so a crash mid-write leaves the previous checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

FORMAT = "fastdp-checkpoint-v1"


def save(engine, *, path, module: nn.Module, optimizer=None, **extra) -> None:
    optimizer = optimizer if optimizer is not None else engine.optimizer
    if optimizer is not None and optimizer.mid_logical_batch():
        raise RuntimeError(
            "cannot checkpoint in the middle of a logical batch: its clipped sums and "
            "micro-batch position would be lost. Save right after a step() that updated the "
            "parameters (optimizer.last_step_updated is True)."
        )
    payload = {
        "format": FORMAT,
        "module": module.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "logical_step": optimizer.logical_step if optimizer is not None else 0,
        "seed": optimizer.seed if optimizer is not None else None,
        "accountant": {"name": engine.accountant_name, "history": list(engine.accountant.history)},
        "noise_multiplier": engine.noise_multiplier,
        "sample_rate": engine.sample_rate,
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
    if payload["accountant"]["name"] != engine.accountant_name:
        raise ValueError(
            f"checkpoint used the {payload['accountant']['name']!r} accountant, this engine "
            f"{engine.accountant_name!r}: create PrivacyEngine(accountant="
            f"{payload['accountant']['name']!r}) to resume it"
        )
    module.load_state_dict(payload["module"])
    if optimizer is not None:
        if payload["optimizer"] is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if payload["seed"] is not None and payload["seed"] != optimizer.seed:
            optimizer.seed = payload["seed"]
            if engine.data_loader is not None:
                engine.data_loader.seed = payload["seed"]
                engine.data_loader._epoch_cache = None
        optimizer.logical_step = payload["logical_step"]
        optimizer.discard_logical_batch()
    engine.accountant.history = [tuple(h) for h in payload["accountant"]["history"]]
    return payload["extra"]
