"""The FLOP floor of a DP step: what BK (book-keeping) clipping must cost at least.

floor = (non-private FLOPs + sum over layers of min(ghost, direct) norm FLOPs) / non-private

Non-private FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
forward and backward of the plain model at the benchmarked shapes (attention included). The
norm FLOPs come from the cost model of ``fastdp.kernels.per_sample_norm`` (``ghost_flops``,
``direct_flops``) applied to every Linear, transformers Conv1D (GPT-2's x @ W) and Conv call,
with a convolution seen through its unfold view (T = output positions, d = C_in/groups *
kernel, p = C_out/groups). The clipped weight GEMM replaces the ordinary one, so it adds
nothing; bias, embedding and norm-layer norms are O(B T d) and left out. Noisy-SGD's floor is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastdp.kernels.per_sample_norm import choose_method, direct_flops, ghost_flops


@dataclass
class Floor:
    """FLOP counts of one model at one shape."""

    nonprivate_flops: int
    norm_flops: int
    methods: dict[str, int]  # how many layer calls pick ghost / direct

    @property
    def ratio(self) -> float:
        return (self.nonprivate_flops + self.norm_flops) / max(self.nonprivate_flops, 1)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.methods.items()))
        return (
            f"non-private {self.nonprivate_flops / 1e9:.3g} GFLOP, "
            f"norms {self.norm_flops / 1e9:.3g} GFLOP ({parts})"
        )


def layer_shapes(module: nn.Module, output: torch.Tensor, input: torch.Tensor):
    """(batch, n_tokens, d_in, d_out) of one Linear/Conv call as the norm rules see it."""
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        batch = input.shape[0]
        n_tokens = math.prod(input.shape[1:-1]) if input.dim() > 2 else 1
        d_in, d_out = (
            module.weight.shape[::-1] if isinstance(module, nn.Linear) else module.weight.shape
        )
        return batch, n_tokens, d_in, d_out
    groups = module.groups
    batch = input.shape[0] * groups
    n_tokens = math.prod(output.shape[2:])
    d_in = module.in_channels // groups * math.prod(module.kernel_size)
    return batch, n_tokens, d_in, module.out_channels // groups


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (weight (d_in, d_out)), without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def flop_floor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> Floor:
    """Count one non-private step of ``model`` on (x, y) and the cheaper norm per layer."""
    calls = []

    def hook(module, args, output):
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            calls.append(layer_shapes(module, output, args[0]))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or _is_hf_conv1d(m)
    ]
    try:
        with FlopCounterMode(display=False) as counter:
            loss_fn(model(x), y).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    norm_flops, methods = 0, {}
    for batch, n_tokens, d_in, d_out in calls:
        if n_tokens == 1:  # ||a||^2 ||g||^2: O(d + p) per sample
            cost, method = 2 * batch * (d_in + d_out), "rank1"
        else:
            method = choose_method(batch, n_tokens, d_in, d_out)
            fn = ghost_flops if method == "ghost" else direct_flops
            cost = fn(batch, n_tokens, d_in, d_out)
        norm_flops += cost
        methods[method] = methods.get(method, 0) + 1
    return Floor(int(counter.get_total_flops()), int(norm_flops), methods)
