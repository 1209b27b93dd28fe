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

A checkpoint holds tensors and plain values only (str, int, float, bool, None, and lists,
tuples and dicts of them): the accountant's history as (sigma, q, steps) numbers, the facts
as a dict. ``save`` refuses anything else before writing; ``load`` reads with
``torch.load(weights_only=True)``, which never runs code from the file (a pickled object
with a ``__reduce__`` is refused, not executed), and checks the result again, since
``torch.serialization.add_safe_globals`` may have widened what that unpickler builds.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from fastdp.errors import CheckpointError

FORMAT = "fastdp-checkpoint-v3"
_OLD_FORMATS = ("fastdp-checkpoint-v1", "fastdp-checkpoint-v2")
_SCALARS = (str, int, float, bool, type(None))


def plain_problem(value, where: str = "checkpoint") -> str | None:
    """Where ``value`` holds something other than tensors and plain values, and what, or None."""
    if isinstance(value, _SCALARS) or type(value) is torch.Tensor:
        return None
    if isinstance(value, torch.Tensor):  # nn.Parameter, or a subclass torch rebuilt
        return f"{where} is a {type(value).__qualname__}, not a plain torch.Tensor"
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            problem = plain_problem(item, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                return f"{where} has a key of type {type(key).__qualname__}"
            problem = plain_problem(item, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    return f"{where} is a {type(value).__module__}.{type(value).__qualname__}"


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
    history = [[float(s), float(q), int(n)] for s, q, n in engine.accountant.history]
    payload = {
        "format": FORMAT,
        "module": module.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "run": run.facts(),
        "logical_step": int(run.logical_step),
        "secret": int(run.secret),
        "accountant": {"name": engine.accountant_name, "history": history},
        "extra": extra,
    }
    problem = plain_problem(payload)
    if problem:
        raise CheckpointError(
            f"cannot save: {problem}. A checkpoint holds tensors and plain values only (str, "
            "int, float, bool, None, lists, tuples and dicts of them), so that loading it "
            "runs no code. Convert it (e.g. torch.as_tensor for a numpy array, a dict for "
            "an object's fields) before passing it to save_checkpoint."
        )
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


def read(path) -> dict:
    """The checked payload of a fastdp checkpoint file (no code from the file runs)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds an object that is not a tensor or plain value "
            f"({str(err).splitlines()[-1][:200]}); loading it could run code from the file, "
            "so nothing was loaded. fastdp checkpoints hold tensors and plain values only: "
            "load checkpoints written by fastdp's save_checkpoint from a source you trust."
        ) from err
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({type(err).__name__}: {err}); "
            "nothing was restored. Load an earlier checkpoint."
        ) from err
    found = payload.get("format") if isinstance(payload, dict) else None
    if found in _OLD_FORMATS:
        raise CheckpointError(
            f"{str(path)!r} is a {found} checkpoint, written by an older fastdp that stored "
            f"pickled objects; this fastdp reads {FORMAT} only (tensors and plain values, "
            "loaded without running code). Resume it with the fastdp version that wrote it "
            "and save it again with this one, or restart the run."
        )
    if found != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a fastdp checkpoint ({FORMAT})")
    problem = plain_problem(payload)
    if problem:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not plain: {problem}. Nothing was restored."
        )
    return payload


def load(engine, *, path, module: nn.Module, optimizer=None) -> dict:
    optimizer = optimizer if optimizer is not None else engine.optimizer
    payload = read(path)
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
    run.secret = payload["secret"]
    run.logical_step = payload["logical_step"]  # before the optimizer state, which carries it
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if optimizer is not None:
        optimizer.discard_logical_batch()
    engine.accountant.history = [
        (float(s), float(q), int(n)) for s, q, n in payload["accountant"]["history"]
    ]
    return payload["extra"]


def _check_same_run(saved: dict, current: dict, path) -> None:
    """Refuse to resume into an engine whose privacy facts differ, naming the field."""
    for field, value in saved.items():
        now = current.get(field)
        same = value == now
        if isinstance(value, float) and isinstance(now, float):
            same = value == now or abs(value - now) <= 1e-12 * max(abs(value), abs(now))
        if not same:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written by a run with {field}={value!r}, but this "
                f"engine has {field}={now!r}: resuming would account its steps under the wrong "
                f"assumptions. Call make_private with {field}={value!r} (and the same other "
                "settings) before load_checkpoint."
            )
