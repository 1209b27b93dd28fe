"""Block sizes, warps, stages and split factors for every kernel, in one place.

Every launcher asks this module for its launch parameters, and so does the compile check
(bench/compile_report.py, tests/test_compile.py), which compiles each kernel for sm_80 and
sm_90 at exactly these parameters: there is no second copy of "what the launcher picks".

Each helper takes sizes, dtypes and a ``DeviceSpec`` (never strides or eps) and returns a
small frozen config. ``spec`` None means the interpreter (TRITON_INTERPRET=1, CPU): blocks are
then the smallest ``tl.dot`` accepts (16), so the tests cover several tiles and masked edges at
tiny shapes and numpy runs fewer wasted lanes.

GEMM tiles (clipped GEMM and the direct norm; M = p, N = d, K = rows or tokens):
- tensor cores (bf16/fp16 always, fp32 as TF32 when torch allows it): 128 x 128 output tile,
  8 warps. The fp32 accumulator is 128 * 128 * 4 B / 256 threads = 64 registers a thread,
  but with operand fragments, addresses and the bias sum the compiled kernels use 122-182
  (tests/test_compile.py reports them): one program per SM is planned (two fit only at <= 128
  registers). K step 64 (bf16) or 32 (TF32) keeps a stage at 32 KiB, 3 stages 96 KiB of
  shared memory (168 KiB before, with fp32 at K step 64: over A100's 163 KiB per block).
- fp32 without TF32 (FMA units): 64 x 128 x 32, 4 warps (64 accumulator registers a thread;
  the 128 x 128 tile on 8 warps sat at 255 registers and spilled), 3 stages, 48 KiB.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fastdp.kernels.dispatch import interpreter_enabled


@dataclass(frozen=True)
class DeviceSpec:
    """What the configs need to know about a GPU: compute capability (80 = sm_80), SMs,
    and the shared memory a block may use and an SM holds (bytes)."""

    arch: int
    sm_count: int
    max_shared_per_block: int
    shared_per_sm: int
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    name: str = ""


# The targets the compile check covers (the opt-in per-block limits of the CUDA guide).
A100 = DeviceSpec(80, 108, 166_912, 167_936, name="A100")
H100 = DeviceSpec(90, 132, 232_448, 233_472, name="H100 SXM")
TARGETS = {80: A100, 90: H100}

_COMPILE_TARGET: list[DeviceSpec] = []  # set by ``compile_target`` (offline compile check)


@contextlib.contextmanager
def compile_target(spec: DeviceSpec) -> Iterator[None]:
    """Within this block every non-CPU device is ``spec``: the launchers then pick, for
    tensors on the ``meta`` device, the configs they would pick on that GPU."""
    _COMPILE_TARGET.append(spec)
    try:
        yield
    finally:
        _COMPILE_TARGET.pop()


@functools.cache
def _cuda_spec(index: int) -> DeviceSpec:
    props = torch.cuda.get_device_properties(index)
    arch = props.major * 10 + props.minor
    known = TARGETS.get(arch)
    per_block = getattr(props, "shared_memory_per_block_optin", 0) or (
        known.max_shared_per_block if known else 101_376
    )
    per_sm = getattr(props, "shared_memory_per_multiprocessor", 0) or per_block + 1024
    return DeviceSpec(arch, props.multi_processor_count, per_block, per_sm, name=props.name)


def device_spec(device: torch.device) -> DeviceSpec | None:
    """The GPU a launch targets; None under the interpreter (CPU tensors)."""
    if _COMPILE_TARGET and device.type != "cpu":
        return _COMPILE_TARGET[-1]
    if device.type == "cuda" and not interpreter_enabled():
        return _cuda_spec(device.index if device.index is not None else 0)
    return None


@dataclass(frozen=True)
class TileConfig:
    """Tile shape of a GEMM-like kernel: an (m, n) output tile stepped over k.

    ``programs_per_sm`` is the occupancy the config is designed for (registers and shared
    memory allow that many resident programs); split-K sizes its waves with it, and the
    compile check verifies the compiled kernel reaches it.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 1


@dataclass(frozen=True)
class ElementwiseConfig:
    """Elements per program of a memory-bound kernel."""

    block: int
    num_warps: int = 4


def operand_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The ``tl.dot`` operand type of inputs of ``dtypes``: their common type, else float32."""
    return dtypes[0] if len(set(dtypes)) == 1 else torch.float32


def uses_tensor_cores(dtype: torch.dtype) -> bool:
    """bf16/fp16 always; fp32 as TF32 when torch's matmul setting allows it."""
    return dtype in (torch.bfloat16, torch.float16) or dot_precision(dtype) == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for float32 inputs, following torch's own matmul setting
    (``torch.backends.cuda.matmul.allow_tf32``, as non-private training would run)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _shared_fits(cfg: TileConfig, element_bytes: int, spec: DeviceSpec) -> int:
    """Programs per SM that the pipelined operand buffers leave room for."""
    stage = (cfg.block_m + cfg.block_n) * cfg.block_k * element_bytes
    need = stage * cfg.num_stages + 1024  # + the per-block reserve
    return spec.shared_per_sm // need if need <= spec.max_shared_per_block else 0


def gemm_tile(dtype: torch.dtype, spec: DeviceSpec | None) -> TileConfig:
    """The (p, d) output tile of the clipped GEMM and the direct norm (see module doc)."""
    if spec is None:
        return TileConfig(16, 16, 16)
    if uses_tensor_cores(dtype):  # registers allow one program per SM (module doc)
        element = torch.finfo(dtype).bits // 8
        cfg, by_registers = TileConfig(128, 128, 128 // element, num_warps=8, num_stages=3), 1
    else:  # 255 registers x 4 warps: two programs per SM
        cfg, by_registers, element = TileConfig(64, 128, 32, num_warps=4, num_stages=3), 2, 4
    programs = min(by_registers, _shared_fits(cfg, element, spec))
    return TileConfig(**{**cfg.__dict__, "programs_per_sm": programs})


def norm_direct_config(d_in: int, d_out: int, dtype: torch.dtype, spec: DeviceSpec | None):
    """(p, d) tile of G_i^T A_i per program, stepped over T; m = p, n = d, k = T."""
    return gemm_tile(dtype, spec)


def norm_ghost_config(n_tokens: int, dtype: torch.dtype, spec: DeviceSpec | None) -> TileConfig:
    """(T, T) Gram tile pair per program; m = n = token block, k = feature step.

    Two 64 x 64 float32 Gram accumulators (32 registers a thread each at 4 warps); the K step
    is 64 for tensor cores and 32 for FMA fp32 (shared memory 48 KiB either way at 3 stages).
    """
    if spec is None:
        return TileConfig(16, 16, 16)
    block_t = 64 if n_tokens >= 64 else 32 if n_tokens > 16 else 16
    block_k = 64 if torch.finfo(dtype).bits == 16 else 32
    return TileConfig(block_t, block_t, block_k, num_warps=4, num_stages=3, programs_per_sm=2)


@dataclass(frozen=True)
class ClippedGradPlan:
    """Launch of the clipped GEMM: tile, K splits and rows per split (a multiple of block_k)."""

    tile: TileConfig
    n_tiles: int
    n_split: int
    rows_per_split: int


def wave_efficiency(n_programs: int, slots: int) -> float:
    """Busy fraction of ``slots`` resident-program slots over the waves ``n_programs`` take."""
    return n_programs / (math.ceil(n_programs / slots) * slots)


def clipped_grad_plan(
    d_out: int,
    d_in: int,
    n_rows: int,
    dtype: torch.dtype,
    spec: DeviceSpec | None,
) -> ClippedGradPlan:
    """Tile and split-K of out (p, d) += G^T A over ``n_rows`` = B*T rows.

    Occupancy first (``gemm_tile``): the tensor-core tile holds one program per SM (122-182
    registers at 8 warps; A100's shared memory holds one anyway), the FMA fp32 tile two (255
    registers at 4 warps). The compile test checks that every compiled kernel reaches the
    ``programs_per_sm`` assumed here.

    Then the waves: a (768, 768) weight is 36 tiles of 128 x 128, 14-27% of the 132 or 264
    program slots of an H100. Splitting the rows S ways gives 36 S programs; S is the smallest
    split whose last wave is >= 90% full (else the fullest, ties to fewer splits), with >= 8 K
    steps per split so the loop amortises its prologue and the float32 partials (8 S p d
    bytes, written and read once) stay small next to the inputs (2 B T (p + d) bytes in bf16).
    768 x 768 in bf16, B=64 T=1024 or B=4096 T=1: S = 7 on H100 (252 programs: 95% of two
    waves of 132, and of one wave of 264 where a kernel fits two programs per SM), S = 3 on
    A100 (108 programs for 108 SMs). The old rule (two programs per SM assumed, S =
    ceil(2 * SMs / tiles) = 8) made 288 programs for 132 slots: 0.73 wave efficiency.
    """
    tile = gemm_tile(dtype, spec)
    n_tiles = math.ceil(d_out / tile.block_m) * math.ceil(d_in / tile.block_n)
    if spec is None:  # interpreter: exercise the split path on small inputs
        n_split = 2 if n_rows >= 4 * tile.block_k else 1
    else:
        slots = spec.sm_count * max(1, tile.programs_per_sm)
        most = max(1, min(64, n_rows // (8 * tile.block_k)))
        splits = range(1, most + 1)
        good = [s for s in splits if wave_efficiency(n_tiles * s, slots) >= 0.9]
        n_split = (
            good[0]
            if good
            else max(splits, key=lambda s: (wave_efficiency(n_tiles * s, slots), -s))
        )
    rows_per_split = math.ceil(math.ceil(max(n_rows, 1) / n_split) / tile.block_k) * tile.block_k
    return ClippedGradPlan(
        tile, n_tiles, math.ceil(max(n_rows, 1) / rows_per_split), rows_per_split
    )


def reduce_config(spec: DeviceSpec | None) -> ElementwiseConfig:
    """The split-K reduction: out += sum over S float32 partials (16-byte vectors)."""
    return ElementwiseConfig(256) if spec is None else ElementwiseConfig(1024, num_warps=4)


def update_config(spec: DeviceSpec | None) -> ElementwiseConfig:
    """Elements per program of the multi-tensor update (even: noise comes in pairs).

    2048 elements on 8 warps is 8 per thread: two 16-byte vectors of float32 per tensor, which
    keeps enough bytes in flight per SM (AdamW moves 28 B per element) without spilling.
    """
    if spec is None:
        return ElementwiseConfig(64)
    return ElementwiseConfig(2048, num_warps=8)
