"""Habits users bring from PyTorch, Opacus and Hugging Face, met where fastdp's step runs.

Small checks the optimizer and the loader call: a ``transformers.Trainer`` stepping a
DPOptimizer on its own loader (refused), an LR scheduler stepped per micro-batch (warned
once), the logical step carried in ``optimizer.state_dict()`` (warned when a load would not
restore the accounting), and Opacus's ``BatchMemoryManager`` around fastdp's loader.
"""

from __future__ import annotations

import sys
import warnings

from fastdp.errors import LoopProtocolError


def refuse_trainer_loop() -> None:
    """Called when a logical step closes a batch the private loader did not draw: under a
    ``transformers.Trainer`` (not fastdp's DPTrainer) that is the Trainer's own loader, whose
    every step would be accounted at q = 1. Refuse it, naming DPTrainer."""
    trainer_module = sys.modules.get("transformers.trainer")
    if trainer_module is None:
        return
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, trainer_module.Trainer) and not hasattr(owner, "privacy_engine"):
            raise LoopProtocolError(
                "a transformers.Trainer stepped the DPOptimizer on batches of its own "
                "DataLoader: they are not Poisson-sampled, so every step would be accounted at "
                "sample rate 1 (epsilon grows many times faster). Use fastdp.hf.DPTrainer "
                "(Trainer steps become logical steps of fastdp's private loader), or fastdp's "
                "loop with the loader make_private returns."
            )
        frame = frame.f_back


# ---- LR schedulers stepped per micro-batch ------------------------------------------------
def check_lr_within_logical_batch(optimizer, closes: bool | None) -> None:
    """Called at every ``step()``: the learning rates must not change between the micro-batches
    of one logical batch (only a scheduler stepped per micro-batch changes them there, and it
    decays by the micro-batches per logical step too fast). Warns once with the fix."""
    lrs = tuple(group.get("lr") for group in optimizer.param_groups)
    previous = getattr(optimizer, "_habits_lrs", None)
    if previous is not None and previous != lrs and not getattr(optimizer, "_habits_warned", 0):
        optimizer._habits_warned = True
        warnings.warn(
            "the learning rate changed between two micro-batches of one logical batch: an LR "
            "scheduler is stepped per micro-batch, so it decays once per micro-batch, not per "
            "update (fastdp applies one update per logical batch). Step the scheduler only "
            "when optimizer.last_step_updated is True, or size it in logical steps "
            "(loader.logical_steps_per_epoch per epoch).",
            UserWarning,
            stacklevel=3,
        )
    optimizer._habits_lrs = None if closes is not False else lrs


# ---- the logical step in optimizer.state_dict() -------------------------------------------
RUN_KEY = "fastdp_run"


def with_run_position(optimizer, state: dict) -> dict:
    """``optimizer.state_dict()``: the wrapped optimizer's state plus the run's logical step
    and privacy facts (the accountant and the secret live in the engine's checkpoint)."""
    run = optimizer.run
    return {**state, RUN_KEY: {"logical_step": run.logical_step, "facts": run.facts()}}


def check_run_position(optimizer, state: dict) -> dict:
    """``optimizer.load_state_dict()``: strip fastdp's entry and warn when the load restores
    moments from another position or another run, which it cannot account for."""
    state = dict(state)
    saved = state.pop(RUN_KEY, None)
    if saved is None:
        return state
    run = optimizer.run
    facts = run.facts()
    differ = sorted(k for k, v in saved["facts"].items() if facts.get(k) != v)
    if differ:
        then = ", ".join(f"{k}={saved['facts'][k]!r}" for k in differ)
        now = ", ".join(f"{k}={facts.get(k)!r}" for k in differ)
        warnings.warn(
            f"optimizer.load_state_dict: the state was saved by a run with other privacy facts "
            f"({then}; this run has {now}). Only the wrapped "
            "optimizer's state is loaded; this run's epsilon does not cover the earlier run.",
            UserWarning,
            stacklevel=3,
        )
    elif saved["logical_step"] != run.logical_step:
        warnings.warn(
            f"optimizer.load_state_dict restores the optimizer state of logical step "
            f"{saved['logical_step']}, but this run is at step {run.logical_step}: the "
            "accountant, the noise secret and the step are not in the optimizer state, so "
            "epsilon restarts from this run's steps. Resume with engine.save_checkpoint / "
            "engine.load_checkpoint (fastdp.hf.DPTrainer does so from resume_from_checkpoint).",
            UserWarning,
            stacklevel=3,
        )
    return state


# ---- Opacus's BatchMemoryManager ------------------------------------------------------------
class BatchMemoryManagerError(LoopProtocolError, AttributeError):
    """Opacus's BatchMemoryManager (or other code reading ``loader.batch_sampler``) around
    fastdp's loader (an AttributeError too, so ``getattr(loader, name, default)`` works)."""


def refuse_batch_sampler() -> None:
    raise BatchMemoryManagerError(
        "fastdp's private loader has no batch_sampler: it draws its own Poisson logical "
        "batches and already yields them as physical micro-batches. Opacus's "
        "BatchMemoryManager is not needed: pass max_physical_batch_size=<micro-batch> to "
        "make_private and iterate the loader it returns directly (optimizer.step() after each "
        "micro-batch updates once per logical batch)."
    )
