"""Models people train, as benchmark workloads: GPT-2, Llama, ViT, T5 (transformers) and
ResNet-18 with GroupNorm (defined here), all from small random-init configs.

Nothing is downloaded. GPT-2 and Llama are built with ``tie_word_embeddings=False`` (as the
earlier runs were; T5 keeps its ties), ``use_cache=False`` and dropout 0, and are
wrapped so that ``model(x)`` returns the logits tensor the harness's loss expects. The
transformers package stays optional: ``available(name)`` says whether a workload can be built
here, and ``fastdp bench`` skips the ones that cannot (``pip install fastdp[hf]``).

``fallback_modules(model)`` lists the modules fastdp sends to its torch.func fallback
(fastdp/rules/generic.py); ``fallback_cost`` times the fallback's ``norm_sq`` and
``accumulate`` inside a DP step so the benchmark can report their share of the step.
"""

from __future__ import annotations

import contextlib
import importlib
import time
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

HF_MODELS = ("gpt2", "llama", "vit", "t5")
ZOO = ("gpt2", "llama", "resnet18gn", "vit", "t5")
TOKEN_MODELS = ("gpt", "gpt2", "llama", "t5")
IMAGE_MODELS = ("cnn", "resnet18gn", "vit")


def available(name: str) -> str | None:
    """None if workload ``name`` can be built here, else why not (a one-line reason)."""
    if name not in HF_MODELS:
        return None
    try:
        importlib.import_module("transformers")
    except Exception as err:  # absent, or installed and broken
        return f"transformers not importable ({type(err).__name__}: {err}); pip install fastdp[hf]"
    return None


class LogitsOf(nn.Module):
    """``model(**{key: x}).logits``: a transformers model as a tensor-in, tensor-out module."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.key: x}).logits


def gpt2(vocab: int = 512, dim: int = 128, depth: int = 2, heads: int = 4, max_len: int = 256):
    """GPT2LMHeadModel (untied head): Conv1D projections, LayerNorm, learned positions."""
    transformers = importlib.import_module("transformers")
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=max_len, n_embd=dim, n_layer=depth, n_head=heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
        use_cache=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return LogitsOf(transformers.GPT2LMHeadModel(config), "input_ids")


def llama(
    vocab: int = 512,
    dim: int = 128,
    depth: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 344,
    max_len: int = 256,
):
    """LlamaForCausalLM (untied head): RMSNorm, rotary positions, grouped-query attention,
    SwiGLU MLP."""
    transformers = importlib.import_module("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=depth,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_len,
        tie_word_embeddings=False, use_cache=False, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    return LogitsOf(transformers.LlamaForCausalLM(config), "input_ids")


class Seq2SeqLogits(nn.Module):
    """An encoder-decoder's logits with the same ids as encoder and decoder input (the
    harness's token targets are the next ids)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x, decoder_input_ids=x).logits


def t5(vocab: int = 512, dim: int = 128, depth: int = 2, heads: int = 4, max_len: int = 256):
    """T5ForConditionalGeneration as shipped (T5 v1.0): one weight for the shared, encoder and
    decoder embeddings and the head, relative attention bias, T5LayerNorm (the fallback).
    ``max_len`` is unused (relative positions)."""
    transformers = importlib.import_module("transformers")
    config = transformers.T5Config(
        vocab_size=vocab, d_model=dim, d_kv=dim // heads, d_ff=4 * dim, num_layers=depth,
        num_heads=heads, dropout_rate=0.0, use_cache=False,
    )  # fmt: skip
    return Seq2SeqLogits(transformers.T5ForConditionalGeneration(config))


def vit(
    image: int = 32,
    patch: int = 4,
    dim: int = 128,
    depth: int = 2,
    heads: int = 4,
    classes: int = 10,
    in_channels: int = 3,
):
    """ViTForImageClassification: patch conv, class token and position embeddings owned by
    ``ViTEmbeddings`` (no rule: the fallback), pre-norm encoder, linear head."""
    transformers = importlib.import_module("transformers")
    config = transformers.ViTConfig(
        image_size=image, patch_size=patch, num_channels=in_channels, hidden_size=dim,
        num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * dim,
        num_labels=classes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return LogitsOf(transformers.ViTForImageClassification(config), "pixel_values")


class BasicBlockGN(nn.Module):
    """ResNet-18's basic block with GroupNorm in place of BatchNorm."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(min(groups, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.down: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            conv = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
            self.down = nn.Sequential(conv, nn.GroupNorm(min(groups, c_out), c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet18GN(nn.Module):
    """ResNet-18 (2-2-2-2 basic blocks, widths w, 2w, 4w, 8w) with GroupNorm, a CIFAR stem
    (3x3 conv, no max-pool) and global average pooling. ``width=64`` is the standard net."""

    def __init__(
        self, width: int = 16, classes: int = 10, in_channels: int = 3, groups: int = 8
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.gn = nn.GroupNorm(min(groups, width), width)
        blocks, c_in = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if stage == 0 else 2
            blocks.append(BasicBlockGN(c_in, c_out, stride, groups))
            blocks.append(BasicBlockGN(c_out, c_out, 1, groups))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn(self.stem(x)))
        return self.fc(self.blocks(x).mean((2, 3)))


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "gpt2": gpt2,
    "llama": llama,
    "vit": vit,
    "resnet18gn": ResNet18GN,
    "t5": t5,
}


# ---- the fallback's cost ---------------------------------------------------------------------
def fallback_modules(model: nn.Module) -> list[str]:
    """``name (Type)`` of every module whose own trainable parameters fastdp's rules leave to
    the torch.func fallback."""
    from fastdp.rules import is_fallback, rule_for

    out = []
    for name, module in model.named_modules():
        if any(p is not None and p.requires_grad for p in module._parameters.values()):
            if is_fallback(rule_for(module)):
                out.append(f"{name or '<root>'} ({type(module).__name__})")
    return out


@contextlib.contextmanager
def timed_fallback(device: torch.device) -> Iterator[list[float]]:
    """Patch the fallback rule's ``norm_sq`` and ``accumulate`` to add their wall time (s)
    to the one-element list yielded (synchronising the GPU around each call)."""
    from fastdp.rules.generic import GenericRule

    spent = [0.0]
    originals = {name: getattr(GenericRule, name) for name in ("norm_sq", "accumulate")}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def wrap(method):
        def timed(self, *args, **kwargs):
            sync()
            begin = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                sync()
                spent[0] += time.perf_counter() - begin

        return timed

    for name, method in originals.items():
        setattr(GenericRule, name, wrap(method))
    try:
        yield spent
    finally:
        for name, method in originals.items():
            setattr(GenericRule, name, method)


def fallback_cost(
    step: Callable[[], None], steps: int, device: torch.device
) -> tuple[float, float]:
    """(fallback seconds per step, step seconds) over ``steps`` steps of a built DP step."""
    with timed_fallback(device) as spent, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - begin
    return spent[0] / steps, total / steps
