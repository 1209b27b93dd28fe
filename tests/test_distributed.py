"""torch.distributed: two gloo processes equal one process with the same seed."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from oracle import per_sample_loss
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp

STEPS = 6


def _train(rank: int) -> tuple[list[torch.Tensor], float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(90, 5), torch.randn(90, 2)
    engine = fastdp.PrivacyEngine()
    m, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=15),
        noise_multiplier=0.7,
        max_grad_norm=0.5,
        max_physical_batch_size=4,
        seed=5,
    )
    while opt.logical_step < STEPS:
        for xb, yb in loader:
            per_sample_loss(m(xb), yb).mean().backward()
            opt.step()
            opt.zero_grad()
            if opt.logical_step == STEPS:
                break
    return [p.detach().clone() for p in m.parameters()], engine.get_epsilon(1e-5)


def _worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size
    )
    try:
        params, eps = _train(rank)
        torch.save({"params": params, "eps": eps}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_single_process(tmp_path):
    single, eps = _train(0)
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)  # every rank adds the same noise to the same all-reduced sum
    for a, b in zip(single, ranks[0]["params"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # up to float summation order
    assert ranks[0]["eps"] == eps
