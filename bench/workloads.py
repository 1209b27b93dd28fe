"""What the benchmarks run: model specs (sizes by preset or flag) and providers.

A *spec* names a model factory from ``fastdp.models`` or ``fastdp.bench.zoo`` (GPT-2, Llama,
ViT from transformers, ResNet-18-GN) with its constructor arguments and knows how to make a
batch for it. A *provider* turns a spec into one training step at a
fixed (batch size, sequence length): ``torch`` (non-private), ``fastdp-<clipping>`` and
``opacus-hooks`` / ``opacus-ghost``. Every provider builds a fresh model (fastdp modifies
the module in place) from the same seed, and its step is forward, loss, backward,
``optimizer.step()``, ``optimizer.zero_grad()``: with no private loader driving it, every
fastdp ``step()`` is a full logical step (clipping, noise, update), announced to the
optimizer as the private loader would announce it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastdp import models
from fastdp.bench import zoo

PROVIDERS = (
    "torch",
    "fastdp-flat",
    "fastdp-per_layer",
    "fastdp-automatic",
    "fastdp-none",
    "opacus-hooks",
    "opacus-ghost",
)
BASELINE = "torch"
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LR = 1e-3  # small: timing repeats the same batch, the weights must stay finite

Step = Callable[[], None]


@dataclass(frozen=True)
class ModelSpec:
    """A model of the benchmark: factory arguments, input shape and default sizes."""

    name: str
    kwargs: dict = field(default_factory=dict)
    batch_size: int = 32
    seq_len: int = 0  # 0: not a sequence model
    image: int = 32  # side of the square image (cnn only)

    def build(self) -> nn.Module:
        """A fresh model from ``fastdp.models`` (seeded, so every provider starts equal)."""
        torch.manual_seed(0)
        if self.name == "mlp":
            return models.mlp(**self.kwargs)
        if self.name == "conv1d":
            return models.Conv1dNet(**self.kwargs)
        if self.name == "cnn":
            return models.WideResNet(**self.kwargs)
        if self.name == "gpt":
            return models.GPT(**self.kwargs)
        if self.name in zoo.BUILDERS:
            reason = zoo.available(self.name)
            if reason:
                raise ModuleNotFoundError(f"{self.name}: {reason}")
            return zoo.BUILDERS[self.name](**self.kwargs)
        raise ValueError(f"unknown model {self.name!r}; use one of {', '.join(MODEL_NAMES)}")

    def batch(
        self, batch_size: int, seq_len: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random inputs and targets of the model's shape (fixed seed)."""
        gen = torch.Generator().manual_seed(1)
        classes = self.kwargs.get("classes", 10)
        if self.name == "mlp":
            x = torch.randn(batch_size, self.kwargs.get("in_features", 40), generator=gen)
        elif self.name == "conv1d":
            x = torch.randn(batch_size, self.kwargs.get("length", 40), generator=gen)
        elif self.name in zoo.IMAGE_MODELS:
            channels = self.kwargs.get("in_channels", 3)
            side = self.kwargs.get("image", self.image)  # ViT's image size is a config field
            x = torch.randn(batch_size, channels, side, side, generator=gen)
        elif self.name in zoo.TOKEN_MODELS:
            vocab = self.kwargs.get("vocab", 256)
            tokens = torch.randint(vocab, (batch_size, seq_len + 1), generator=gen)
            return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
        else:
            raise ValueError(f"unknown model {self.name!r}")
        y = torch.randint(classes, (batch_size,), generator=gen)
        return x.to(device), y.to(device)

    def with_sizes(self, **changes) -> ModelSpec:
        """A copy with some fields or constructor arguments changed (``kwargs`` merged)."""
        kwargs = {**self.kwargs, **changes.pop("kwargs", {})}
        return replace(self, kwargs=kwargs, **changes)


# Presets. "quick" keeps `fastdp bench --quick` under 3 minutes on 2 CPU cores; "cpu" is
# the fuller CPU run (about 10 minutes); "gpu" the sizes meant for an H100/H200.
PRESETS: dict[str, dict[str, ModelSpec]] = {
    "quick": {
        "mlp": ModelSpec("mlp", dict(in_features=784, hidden=512, depth=2), batch_size=256),
        "cnn": ModelSpec("cnn", dict(depth=10, width=2), batch_size=16, image=16),
        "gpt": ModelSpec(
            "gpt", dict(vocab=256, dim=128, depth=2, heads=4, max_len=512), 16, seq_len=64
        ),
    },
    "cpu": {
        "mlp": ModelSpec("mlp", dict(in_features=784, hidden=1024, depth=3), batch_size=256),
        "cnn": ModelSpec("cnn", dict(depth=16, width=4), batch_size=16, image=32),
        "gpt": ModelSpec(
            "gpt", dict(vocab=512, dim=256, depth=4, heads=4, max_len=1024), 16, seq_len=128
        ),
    },
    "gpu": {
        "mlp": ModelSpec("mlp", dict(in_features=784, hidden=4096, depth=3), batch_size=1024),
        "cnn": ModelSpec("cnn", dict(depth=16, width=4), batch_size=256, image=32),
        "gpt": ModelSpec(
            "gpt", dict(vocab=8192, dim=768, depth=12, heads=12, max_len=2048), 32, seq_len=512
        ),
    },
}
PRESETS["quick"]["conv1d"] = ModelSpec("conv1d", dict(length=40, channels=32), batch_size=256)
PRESETS["cpu"]["conv1d"] = PRESETS["gpu"]["conv1d"] = PRESETS["quick"]["conv1d"]

# Models people train (bench/zoo.py), from small random-init configs: "cpu" sizes take about
# a second per non-private step on one CPU thread (ResNet-18-GN at its real widths, ViT-Tiny's
# dims on 32x32 images in 4x4 patches, GPT-2 and Llama at 4 layers of width 256), "quick" a
# few milliseconds.
_LM = dict(vocab=1024, dim=128, depth=2, heads=4, max_len=256)
PRESETS["quick"].update(
    gpt2=ModelSpec("gpt2", dict(_LM, dim=64), batch_size=8, seq_len=64),
    llama=ModelSpec("llama", dict(_LM, dim=64, hidden=172), batch_size=8, seq_len=64),
    resnet18gn=ModelSpec("resnet18gn", dict(width=8), batch_size=8, image=32),
    vit=ModelSpec("vit", dict(image=32, patch=4, dim=64, depth=2, heads=4), batch_size=8),
    t5=ModelSpec("t5", dict(_LM, dim=64), batch_size=8, seq_len=64),
)
PRESETS["cpu"].update(
    gpt2=ModelSpec("gpt2", dict(_LM, vocab=2048, dim=256, depth=4), batch_size=16, seq_len=128),
    llama=ModelSpec(
        "llama", dict(_LM, vocab=2048, dim=256, depth=4, hidden=688), batch_size=16, seq_len=128
    ),
    resnet18gn=ModelSpec("resnet18gn", dict(width=64), batch_size=16, image=32),  # the real widths
    vit=ModelSpec("vit", dict(image=32, patch=4, dim=192, depth=12, heads=3), batch_size=16),
    t5=ModelSpec("t5", dict(_LM, vocab=2048, dim=256, depth=4), batch_size=16, seq_len=128),
)
PRESETS["gpu"].update(
    gpt2=ModelSpec(
        "gpt2", dict(vocab=50257, dim=768, depth=12, heads=12, max_len=1024), 16, seq_len=512
    ),
    llama=ModelSpec(
        "llama",
        dict(vocab=32000, dim=768, depth=12, heads=12, kv_heads=4, hidden=2048, max_len=1024),
        16,
        seq_len=512,
    ),
    resnet18gn=ModelSpec("resnet18gn", dict(width=64), batch_size=128, image=32),
    vit=ModelSpec("vit", dict(image=224, patch=16, dim=768, depth=12, heads=12), batch_size=64),
    t5=ModelSpec("t5", dict(vocab=32128, dim=768, depth=12, heads=12), 16, seq_len=512),
)
MODEL_NAMES = tuple(PRESETS["cpu"])


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """``["gpt.dim=512", "mlp.batch_size=64"]`` -> {"gpt": {"dim": 512}, "mlp": {...}}."""
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        model, _, attr = key.partition(".")
        if not (model and attr and value):
            raise ValueError(f"--set wants model.arg=value, got {item!r}")
        try:
            parsed: object = int(value)
        except ValueError:
            try:
                parsed = float(value)
            except ValueError:
                parsed = value
        out.setdefault(model, {})[attr] = parsed
    return out


def resolve_specs(preset: str, names: list[str], overrides: dict[str, dict]) -> list[ModelSpec]:
    """The specs of ``names`` from ``preset`` with ``--set`` overrides applied."""
    table = PRESETS[preset]
    specs = []
    for name in names:
        if name not in table:
            raise ValueError(f"unknown model {name!r}; use one of {', '.join(table)}")
        spec = table[name]
        changes = dict(overrides.get(name, {}))
        fields = {k: changes.pop(k) for k in ("batch_size", "seq_len", "image") if k in changes}
        specs.append(spec.with_sizes(kwargs=changes, **fields))
    return specs


# ---- providers -----------------------------------------------------------------------------
def model_loss(spec: ModelSpec, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; a (B, T, V) output is a next-token loss over all positions."""
    if output.dim() == 3:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return F.cross_entropy(output, target)


def _loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=x.shape[0])


def build_step(
    spec: ModelSpec, provider: str, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> Step:
    """One training step of ``provider`` on the fixed batch (x, y); raises if unsupported."""
    model = spec.build().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn: Callable = model_loss
    if provider == "torch":
        pass
    elif provider.startswith("fastdp-"):
        import fastdp

        with warnings.catch_warnings():  # seed, fixed batches, fallback: the rows say so
            warnings.simplefilter("ignore")
            model, optimizer, _ = fastdp.PrivacyEngine().make_private(
                module=model,
                optimizer=optimizer,
                data_loader=_loader(x, y),
                noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=MAX_GRAD_NORM,
                clipping=provider.removeprefix("fastdp-"),
                poisson_sampling=False,
                seed=0,
            )
    elif provider in ("opacus-hooks", "opacus-ghost"):
        model, optimizer, loss_fn = _opacus(spec, provider, model, optimizer, x, y)
    else:
        raise ValueError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")

    # What the private loader signals before the batch it yields (here a whole logical batch),
    # without its data movement, which the other providers do not pay either: layers then
    # know the batch size, e.g. to expand position ids (1, T) that GPT-2 broadcasts.
    fastdp_step = provider.startswith("fastdp-")
    signal = getattr(optimizer, "signal_micro_batch", None) if fastdp_step else None
    batch = x.shape[0]

    def step() -> None:
        if signal is not None:
            signal(is_last=True, size=batch)
        loss = loss_fn(spec, model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _opacus(spec, provider, model, optimizer, x, y):
    from opacus import PrivacyEngine

    mode = provider.removeprefix("opacus-")
    kwargs = dict(
        module=model,
        optimizer=optimizer,
        data_loader=_loader(x, y),
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "hooks":
            model, optimizer, _ = PrivacyEngine().make_private(**kwargs)
            return model, optimizer, model_loss
        model, optimizer, criterion, _ = PrivacyEngine().make_private(
            criterion=nn.CrossEntropyLoss(), **kwargs
        )

    def ghost_loss(spec, output, target):
        if output.dim() == 3:  # per-sequence privacy unit: opacus needs the (B, T, V) shape
            flat = output.reshape(-1, output.shape[-1])
            return criterion(flat, target.reshape(-1), shape=output.shape)
        return criterion(output, target)

    return model, optimizer, ghost_loss
