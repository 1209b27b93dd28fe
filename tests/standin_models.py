"""Local stand-ins for timm's patterns (tests/test_models.py): a parent owning a class token
and position embedding, LayerNorm2d, GroupNormAct, layer scale, a residual ``out +=
identity``. They cover those patterns where timm is absent."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """timm.layers.LayerNorm2d: a LayerNorm subclass overriding forward (channels-first)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GroupNormAct(nn.GroupNorm):
    """timm.layers.GroupNormAct: a GroupNorm subclass overriding forward."""

    def forward(self, x):
        return F.relu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, LayerNorm2d, MLP, layer-scale gamma (a raw parameter), residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.fc1 = nn.Conv2d(dim, 2 * dim, 1)
        self.fc2 = nn.Conv2d(2 * dim, dim, 1)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(self.norm(self.dwconv(x)))))
        return x + y * self.gamma.view(1, -1, 1, 1)


class BasicBlock(nn.Module):
    """ResNet-18's block with GroupNorm and the in-place residual ``out += identity``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.gn1 = GroupNormAct(2, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(2, c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.gn2(self.conv2(self.gn1(self.conv1(x))))
        out += identity
        return F.relu(out, inplace=True)


class ResNetGN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.layer1 = BasicBlock(4, 4)
        self.layer2 = BasicBlock(4, 8, stride=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.gn(self.stem(x)), inplace=True)
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean((2, 3)))


class TinyViT(nn.Module):
    """timm's VisionTransformer pattern: the root owns cls_token and pos_embed, used in its
    own forward around tapped children (patch conv, blocks, head)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])
