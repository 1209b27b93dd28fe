"""Hugging Face ``Trainer`` integration: ``DPTrainer`` trains through fastdp's private step.

One Trainer step is one logical (Poisson) batch: ``global_step``, ``max_steps``, the LR
scheduler, logging, evaluation and saving all count noisy updates, never micro-batches. The
Trainer's batch settings map onto fastdp's::

    expected logical batch  = per_device_train_batch_size * gradient_accumulation_steps
    max_physical_batch_size = per_device_train_batch_size

(``q = logical / len(train_dataset)``). Each Trainer step draws its logical batch from the
private loader, runs forward and backward on each physical micro-batch with a per-sample loss
(each sample's own token mean, never a batch-wide ``num_items_in_batch`` mean, which mixes
samples) and applies one noisy update. ``epsilon`` (at ``target_delta``) is logged at every
logging step. Trainer checkpoints carry fastdp's state (``fastdp_state.pt``: accountant,
secret, logical step and the run's privacy facts) and ``train(resume_from_checkpoint=...)``
restores it, so a resumed run draws the batches and noise the uninterrupted run would.

Needs ``pip install "fastdp[hf]"`` (transformers, peft, accelerate). Single process only.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from fastdp.engine import PrivacyEngine
from fastdp.errors import CheckpointError, LoopProtocolError
from fastdp.optimizer import DPOptimizer

STATE_NAME = "fastdp_state.pt"  # fastdp's checkpoint inside a Trainer checkpoint folder


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample causal-LM losses: sample i's mean over its own valid next-token
    targets (labels shifted by one, -100 ignored); a sample without targets has loss 0."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    valid = (labels != -100).to(tokens.dtype)
    return (tokens * valid).sum(1) / valid.sum(1).clamp(min=1)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample losses of a sequence classifier: cross-entropy, or squared error for
    a single regression output."""
    if logits.shape[-1] == 1 and labels.is_floating_point():
        return (logits.squeeze(-1).float() - labels.float()).square()
    return F.cross_entropy(logits.float(), labels, reduction="none")


def default_per_sample_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """(B,) losses from a transformers output: causal LM for (B, T, V) logits with (B, T)
    labels, else classification (B, K) logits with (B,) labels."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if logits.dim() == 3 and labels.dim() == 2:
        return causal_lm_loss(logits, labels)
    if logits.dim() == 2 and labels.dim() == 1:
        return classification_loss(logits, labels)
    raise ValueError(
        f"DPTrainer's default loss knows causal LM ((B, T, V) logits, (B, T) labels) and "
        f"classification ((B, K) logits, (B,) labels), not logits {tuple(logits.shape)} with "
        f"labels {tuple(labels.shape)}: pass per_sample_loss=fn(outputs, labels) -> (B,) losses."
    )


class _LogicalBatch(dict):
    """What the Trainer's loop sees of one logical batch: an empty mapping (so the Trainer's
    token and FLOP counters skip it); ``training_step`` pulls its micro-batches."""

    def __init__(self, micro_batches: Iterator, count: int) -> None:
        super().__init__()
        self.micro_batches, self.count = micro_batches, count


class _LogicalBatches:
    """The Trainer's train dataloader: one item per logical step of the private loader.

    ``len`` is the logical steps of an epoch; an iteration yields the rest of the current
    epoch from the optimizer's logical step on (so a resumed run continues in place)."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return self.loader.logical_steps_per_epoch

    def __iter__(self) -> Iterator[_LogicalBatch]:
        loader, optimizer = self.loader, self.loader.optimizer
        steps = loader.logical_steps_per_epoch
        start = optimizer.logical_step
        micro = iter(loader)
        try:
            for t in range(start, (start // steps + 1) * steps):
                yield _LogicalBatch(micro, len(loader.micro_batches(t)))
        finally:
            close = getattr(micro, "close", None)
            if close is not None:
                close()


class DPTrainer(Trainer):
    """A ``transformers.Trainer`` whose steps are fastdp's private logical steps.

    Privacy settings are keyword arguments (``noise_multiplier``, ``max_grad_norm``,
    ``clipping``, ``accountant``, ``poisson_sampling``, ``seed``, ``target_delta``); the rest
    goes to ``Trainer``. ``optimizers=(torch_optimizer, scheduler)`` is accepted with a plain
    optimizer (it is made private here); by default the Trainer's own is. ``per_sample_loss``
    maps (model outputs, labels) to (B,) losses (default: ``default_per_sample_loss``).
    ``self.privacy_engine`` is the engine; ``self.epsilon()`` the epsilon spent so far.
    """

    def __init__(
        self,
        model=None,
        args: TrainingArguments | None = None,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        clipping: str = "flat",
        accountant: str = "prv",
        poisson_sampling: bool = True,
        seed: int | None = None,
        target_delta: float = 1e-5,
        per_sample_loss: Callable | None = None,
        **kwargs,
    ) -> None:
        optimizers = kwargs.get("optimizers", (None, None))
        if isinstance(optimizers[0], DPOptimizer):
            raise LoopProtocolError(
                "DPTrainer got a DPOptimizer in optimizers=: it makes the optimizer private "
                "itself, over its own Poisson loader. Pass the plain torch optimizer (or none: "
                "the Trainer's default is made private)."
            )
        args = copy.copy(args) if args is not None else TrainingArguments(output_dir="tmp_trainer")
        if args.world_size > 1:
            raise LoopProtocolError(
                f"DPTrainer runs in one process (this run has world size {args.world_size}): "
                "the Trainer would wrap the model in DistributedDataParallel, which all-reduces "
                "unclipped gradients. For several processes use fastdp's own loop under "
                "torchrun (make_private on the bare model; see docs/distributed.md)."
            )
        if args.auto_find_batch_size:
            raise LoopProtocolError(
                "auto_find_batch_size would change the logical batch, and with it the sample "
                "rate, mid-run: set per_device_train_batch_size (the physical micro-batch) "
                "and gradient_accumulation_steps (logical batch = their product) instead."
            )
        physical = args.per_device_train_batch_size
        self.logical_batch_size = physical * args.gradient_accumulation_steps
        self.gradient_accumulation_steps_requested = args.gradient_accumulation_steps
        args.gradient_accumulation_steps = 1  # one Trainer step = one logical batch
        args.max_grad_norm = 0.0  # clipping is per sample, inside fastdp's step
        super().__init__(model=model, args=args, **kwargs)
        if self.train_dataset is None:
            raise ValueError("DPTrainer needs a train_dataset to sample logical batches from")
        self.target_delta = target_delta
        self.per_sample_loss = per_sample_loss or default_per_sample_loss
        dataset = self.train_dataset
        if _is_hf_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        loader = DataLoader(
            dataset,
            batch_size=self.logical_batch_size,
            shuffle=True,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
        )
        optimizer = self.create_optimizer()
        self.privacy_engine = PrivacyEngine(accountant=accountant)
        model, self.optimizer, self.private_loader = self.privacy_engine.make_private(
            module=self.model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            clipping=clipping,
            poisson_sampling=poisson_sampling,
            max_physical_batch_size=physical,
            seed=seed,
        )
        self.model = self.model_wrapped = model

    # ---- privacy -----------------------------------------------------------------------------
    @property
    def dp_optimizer(self) -> DPOptimizer:
        return self.privacy_engine.optimizer

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default ``target_delta``)."""
        return self.privacy_engine.get_epsilon(delta or self.target_delta)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.pop("grad_norm", None)  # the Trainer's norm of p.grad: clipping happens per sample
        if "loss" in logs or "train_loss" in logs:
            logs["epsilon"] = self.epsilon()
            logs["dp_logical_step"] = self.dp_optimizer.logical_step
        super().log(logs, start_time)

    # ---- the loop ----------------------------------------------------------------------------
    def get_train_dataloader(self):
        return _LogicalBatches(self.private_loader)

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        # the private loader's position is the optimizer's logical step, restored from
        # fastdp_state.pt: it continues where the checkpoint stopped without skipping
        return dataloader

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        return batches, None  # no num_items_in_batch: that batch-wide count mixes samples

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Forward and backward on every micro-batch of one logical batch; the Trainer's own
        ``optimizer.step()`` after this applies the one noisy update."""
        if not isinstance(inputs, _LogicalBatch):
            raise LoopProtocolError(
                "DPTrainer.training_step got a batch that is not one of the private loader's "
                "logical batches: DPTrainer draws its own (get_train_dataloader must not be "
                "overridden)."
            )
        model.train()
        total, count = torch.zeros((), device=self.args.device), 0
        for j in range(inputs.count):
            batch = self._prepare_inputs(next(inputs.micro_batches))
            n = _rows(batch)
            if n:
                with self.compute_loss_context_manager():
                    losses = self._per_sample_losses(model, batch)
                losses.mean().backward()
                total = total + losses.detach().sum()
                count += n
                self.current_flos += float(super().floating_point_ops(batch))
            if j < inputs.count - 1:
                self.dp_optimizer.step()  # closes a micro-batch; no update yet
        return total / max(count, 1)

    def _per_sample_losses(self, model, inputs: dict) -> torch.Tensor:
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("DPTrainer needs 'labels' in each batch for the per-sample loss")
        return self.per_sample_loss(model(**inputs), labels)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean of the per-sample losses (evaluation; training uses ``training_step``)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = self.per_sample_loss(outputs, labels).mean()
        return (loss, outputs) if return_outputs else loss

    # ---- checkpoints -------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        self.privacy_engine.save_checkpoint(
            path=os.path.join(output_dir, STATE_NAME),
            module=self.model,
            optimizer=self.dp_optimizer,
        )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_NAME)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{checkpoint!r} has no {STATE_NAME}: it was not written by DPTrainer (or with "
                "save_only_model=True), so the accountant, the noise secret and the logical "
                "step cannot be restored. Resume from a DPTrainer checkpoint saved with its "
                "optimizer."
            )
        self.privacy_engine.load_checkpoint(
            path=path, module=self.model, optimizer=self.dp_optimizer
        )
        scheduler = os.path.join(checkpoint, "scheduler.pt")
        if self.lr_scheduler is not None and os.path.isfile(scheduler):
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))


def _rows(batch) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    return 0


def _is_hf_dataset(dataset) -> bool:
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(dataset, datasets.Dataset)
