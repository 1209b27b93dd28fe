"""Small model factories shared by the demo, the benchmarks and the experiments.

Every model uses only layers fastdp has per-sample rules for (Linear, Conv1d/2d, Embedding,
LayerNorm, GroupNorm); normalisation is GroupNorm, never BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(in_features: int = 40, hidden: int = 256, depth: int = 2, classes: int = 10) -> nn.Module:
    """``depth`` hidden Linear+ReLU layers, then a Linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


class Conv1dNet(nn.Module):
    """Conv1d + GroupNorm net for 1-D signals of shape (B, length) or (B, 1, length)."""

    def __init__(self, length: int = 40, channels: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2),
            nn.GroupNorm(4, channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.GroupNorm(4, channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(channels * ((length + 3) // 4), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


class _WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            if stride != 1 or c_in != c_out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.norm2(out)))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-width with GroupNorm (as TAN uses for DP CIFAR-10); WRN-16-4 by default."""

    def __init__(
        self,
        depth: int = 16,
        width: int = 4,
        classes: int = 10,
        groups: int = 16,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths[1:]):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_WideBlock(c_in, c_out, stride, min(groups, c_in)))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(min(groups, c_in), c_in)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm(self.blocks(self.stem(x))))
        return self.head(out.mean((2, 3)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(batch, length, 3, self.heads, -1).unbind(2)
        attn = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, length, dim))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2-style decoder: token and position embeddings, LayerNorm, 3-D Linear layers.

    Positions are embedded from ``positions.expand(B, T)`` so that every parameter is used
    with a batch dimension (fastdp needs per-sample gradients of the position table too).
    """

    def __init__(
        self, vocab: int = 256, dim: int = 128, depth: int = 2, heads: int = 4, max_len: int = 128
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        batch, length = idx.shape
        pos = torch.arange(length, device=idx.device).expand(batch, length).contiguous()
        x = self.tokens(idx) + self.positions(pos)
        return self.head(self.ln(self.blocks(x)))
