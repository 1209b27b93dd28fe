"""fastdp.hf.DPTrainer against the plain fastdp loop: same parameters and epsilon after k
logical steps (noise on), Trainer steps = logical steps, resume through fastdp's state."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch.utils.data import DataLoader  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    default_data_collator,
    get_linear_schedule_with_warmup,
)

import fastdp  # noqa: E402
from fastdp.errors import CheckpointError, LoopProtocolError  # noqa: E402
from fastdp.hf import DPTrainer, causal_lm_loss  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:an explicit seed:UserWarning")

N, T, PHYSICAL, ACCUMULATE, STEPS, SIGMA, C, SEED, LR = 32, 8, 4, 2, 3, 1.0, 1.0, 3, 1e-2


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def _lora():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["c_attn"])
    model = _gpt2()
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def _data() -> list[dict]:
    """Samples with different numbers of valid labels (padding as -100)."""
    g = torch.Generator().manual_seed(1)
    data = []
    for i in range(N):
        ids = torch.randint(0, 64, (T,), generator=g)
        labels = ids.clone()
        labels[T - i % 3 :] = -100
        data.append({"input_ids": ids, "labels": labels})
    return data


def _args(tmp_path, **kw) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=PHYSICAL,
        gradient_accumulation_steps=ACCUMULATE, max_steps=STEPS, logging_steps=1,
        learning_rate=LR, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    return TrainingArguments(**(settings | kw))


def _trainer(tmp_path, model, **kw) -> DPTrainer:
    args = _args(tmp_path, **kw.pop("args", {}))
    return DPTrainer(
        model=model, args=args, train_dataset=_data(), noise_multiplier=SIGMA,
        max_grad_norm=C, seed=SEED, **kw,
    )  # fmt: skip


def _fastdp_loop(model, tmp_path, steps: int = STEPS):
    """The oracle: fastdp's own loop with the Trainer's optimizer and linear schedule."""
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path))
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [[p for n, p in named if n in decay], [p for n, p in named if n not in decay]]
    # the Trainer's two groups, in its order (the order keys each parameter's noise stream)
    optimizer = cls([{"params": g, "weight_decay": 0.0} for g in groups], **kwargs)
    engine = fastdp.PrivacyEngine()
    loader = DataLoader(
        _data(), batch_size=PHYSICAL * ACCUMULATE, shuffle=True, collate_fn=default_data_collator
    )
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=SIGMA,
        max_grad_norm=C, max_physical_batch_size=PHYSICAL, seed=SEED,
    )  # fmt: skip
    schedule = get_linear_schedule_with_warmup(optimizer, 0, steps)
    while optimizer.logical_step < steps:
        for batch in loader:
            if len(batch["labels"]):
                logits = model(input_ids=batch["input_ids"]).logits
                causal_lm_loss(logits, batch["labels"]).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            if optimizer.last_step_updated:
                schedule.step()
                if optimizer.logical_step == steps:
                    break
    return model, engine.get_epsilon(1e-5)


def _assert_same(a, b) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("make", [_gpt2, _lora], ids=["gpt2", "lora_gpt2"])
def test_dptrainer_equals_fastdp_loop(tmp_path, make):
    trainer = _trainer(tmp_path, make())
    out = trainer.train()
    reference, eps = _fastdp_loop(make(), tmp_path)
    _assert_same(trainer.model, reference)
    assert trainer.epsilon() == eps > 0
    # Trainer steps are logical steps: global_step, the scheduler, the logs
    assert out.global_step == trainer.dp_optimizer.logical_step == STEPS
    assert trainer.lr_scheduler.last_epoch == STEPS
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3]
    assert [h["dp_logical_step"] for h in logged] == [1, 2, 3]
    assert logged[-1]["epsilon"] == eps and logged[0]["epsilon"] < eps
    assert all("grad_norm" not in h for h in logged)
    assert logged[1]["learning_rate"] == pytest.approx(LR * 2 / 3)
    assert trainer.private_loader.expected_batch_size == PHYSICAL * ACCUMULATE


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    steps = 4
    full = _trainer(tmp_path / "a", _gpt2(), args=dict(max_steps=steps))
    full.train()
    first = _trainer(
        tmp_path / "b", _gpt2(), args=dict(max_steps=steps, save_strategy="steps", save_steps=2)
    )
    first.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    assert (checkpoint / "fastdp_state.pt").is_file()
    resumed = _trainer(tmp_path / "b", _gpt2(), args=dict(max_steps=steps))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    _assert_same(resumed.model, full.model)
    assert resumed.epsilon() == full.epsilon()
    assert resumed.state.global_step == resumed.dp_optimizer.logical_step == steps


def test_resume_without_fastdp_state_is_refused(tmp_path):
    first = _trainer(tmp_path, _gpt2(), args=dict(save_strategy="steps", save_steps=2))
    first.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    (checkpoint / "fastdp_state.pt").unlink()
    resumed = _trainer(tmp_path, _gpt2())
    with pytest.raises(CheckpointError, match="has no fastdp_state.pt"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_dp_optimizer_passed_to_dptrainer_is_refused(tmp_path):
    model = _gpt2()
    engine = fastdp.PrivacyEngine()
    _, dp_optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(), batch_size=8, collate_fn=default_data_collator),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )  # fmt: skip
    with pytest.raises(LoopProtocolError, match="makes the optimizer private itself"):
        _trainer(tmp_path, model, optimizers=(dp_optimizer, None))


def test_plain_trainer_with_dp_optimizer_is_refused(tmp_path):
    """Trainer(optimizers=(dp_optimizer, None)) steps on the Trainer's own (unsampled) loader:
    refused at the first step instead of accounting every step at q = 1."""
    model = _gpt2()
    engine = fastdp.PrivacyEngine()
    model, dp_optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(), batch_size=8, collate_fn=default_data_collator),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=_args(tmp_path, gradient_accumulation_steps=1),
        train_dataset=_data(), optimizers=(dp_optimizer, None),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LoopProtocolError, match="fastdp.hf.DPTrainer"):
            trainer.train()
    assert engine.accountant.history == []


def test_distributed_and_auto_batch_refused(tmp_path):
    with pytest.raises(LoopProtocolError, match="auto_find_batch_size"):
        _trainer(tmp_path, _gpt2(), args=dict(auto_find_batch_size=True))
