"""The models of ``fastdp bench host``: negligible width, so a step's time is what the host
spends issuing it.

- ``gpt2``: transformers ``GPT2LMHeadModel`` from a config with GPT-2 small's modules and
  depth (12 blocks: Conv1D projections, LayerNorm, learned positions, the head tied to the
  token embedding as shipped) at n_embd 32, 2 heads, vocabulary 128, 64 positions, dropout 0;
  B=4, T=8, next-token loss.
- ``cnn``: the ResNet-18 shape with GroupNorm (``bench/zoo.py``'s ``ResNet18GN``: a stem, 4
  stages of 2 basic blocks) at width 8, 16x16 RGB input, B=4.
- ``mlp``: 13 ``Linear`` layers of width 64 (12 with ReLU, then a 10-way head), B=8.
- ``mlp4``: 4 ``Linear`` layers of width 64, for the graph-break count only.

Loss: cross entropy, mean over the batch (over every position of every sequence for the LM,
the same for every sample as T is fixed). Every build is seeded, so every provider starts
from the same weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.bench.zoo import LogitsOf, ResNet18GN, available

CLASSES = 10


@dataclass(frozen=True)
class HostModel:
    """A host-cost workload: a seeded model factory and its fixed batch."""

    name: str
    build_fn: Callable[[], nn.Module]
    batch_fn: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    describe: str
    needs: str = ""  # an optional package the model needs ("transformers")

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build_fn()

    def batch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch_fn(torch.Generator().manual_seed(1))
        return x.to(device), y.to(device)

    @property
    def batch_size(self) -> int:
        return int(self.batch(torch.device("cpu"))[0].shape[0])

    @property
    def seq_len(self) -> int:
        x = self.batch(torch.device("cpu"))[0]
        return int(x.shape[1]) if x.dim() == 2 and self.name.startswith("gpt") else 0

    def unavailable(self) -> str | None:
        """Why this model cannot be built here, or None."""
        return available("gpt2") if self.needs == "transformers" else None


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy; a (B, T, V) output is a next-token loss over all positions."""
    if output.dim() == 3:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return F.cross_entropy(output, target)


def _gpt2() -> nn.Module:
    transformers = importlib.import_module("transformers")
    config = transformers.GPT2Config(
        vocab_size=128, n_positions=64, n_embd=32, n_layer=12, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return LogitsOf(transformers.GPT2LMHeadModel(config), "input_ids")


def _tokens(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(128, (4, 9), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _mlp(layers: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        body: list[nn.Module] = []
        for _ in range(layers - 1):
            body += [nn.Linear(64, 64), nn.ReLU()]
        return nn.Sequential(*body, nn.Linear(64, CLASSES))

    return build


def _vectors(batch: int) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def make(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(batch, 64, generator=gen), torch.randint(
            CLASSES, (batch,), generator=gen
        )

    return make


def _images(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3, 16, 16, generator=gen), torch.randint(CLASSES, (4,), generator=gen)


HOST_MODELS: dict[str, HostModel] = {
    "gpt2": HostModel(
        "gpt2", _gpt2, _tokens,
        "GPT2LMHeadModel 12 layers, n_embd 32, 2 heads, vocab 128, tied head; B=4 T=8",
        needs="transformers",
    ),
    "cnn": HostModel(
        "cnn", lambda: ResNet18GN(width=8, classes=CLASSES), _images,
        "ResNet-18-GN shape (4 stages x 2 basic blocks), width 8, 16x16; B=4",
    ),
    "mlp": HostModel("mlp", _mlp(13), _vectors(8), "13 Linear d=64; B=8"),
    "mlp4": HostModel("mlp4", _mlp(4), _vectors(8), "4 Linear d=64; B=8"),
}  # fmt: skip
DEFAULT_MODELS = ("gpt2", "cnn", "mlp")
