"""Compiled Philox4x32-10 for the CPU noise: the Box-Muller inputs (u1, u2) of a block range.

numpy emulates Philox's 32x32 -> 64-bit multiplies on uint64 lanes at about 20 ns per block
(two normals); this 20-line C loop, which the compiler vectorises (one clone per x86-64 level,
picked at load time), takes about 3 ns, which keeps the noise at torch.randn's speed. It is
built once per machine with the system C compiler into ``$XDG_CACHE_HOME/fastdp`` (or
``~/.cache/fastdp``) and loaded with ctypes, which releases the GIL during the call. Without a
compiler ``load()`` returns None and noise.py uses numpy: u1 and u2 are exact IEEE float32
functions of the Philox words (products by powers of two, one rounding per sum), so both paths
give bit-identical values, which tests/test_noise.py checks.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

_SOURCE = r"""
#include <stdint.h>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NO_CLONES)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void fastdp_philox_uniform_pairs(uint32_t start, int64_t n, uint32_t c1, uint32_t c2,
                                 uint32_t c3, uint32_t k0, uint32_t k1, float *u1, float *u2) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t x0 = start + (uint32_t)i, x1 = c1, x2 = c2, x3 = c3, a = k0, b = k1;
    for (int r = 0; r < 10; ++r) {
      uint64_t p0 = (uint64_t)0xD2511F53u * x0, p1 = (uint64_t)0xCD9E8D57u * x2;
      x0 = (uint32_t)(p1 >> 32) ^ x1 ^ a;
      x1 = (uint32_t)p1;
      x2 = (uint32_t)(p0 >> 32) ^ x3 ^ b;
      x3 = (uint32_t)p0;
      a += 0x9E3779B9u;
      b += 0xBB67AE85u;
    }
    float v = (float)x0 * 0x1p-32f + ((float)x1 + 0.5f) * 0x1p-64f;
    u1[i] = v < 1.0f ? v : 1.0f;
    u2[i] = (float)x2 * 0x1p-32f;
  }
}
"""
_FLAGS = ["-O3", "-ffp-contract=off", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fastdp"


def _build(target: Path) -> bool:
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    compiler = compiler.split()[0]
    if shutil.which(compiler) is None:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "philox.c"
        source.write_text(_SOURCE)
        built = Path(tmp) / target.name
        for extra in ([], ["-DNO_CLONES"]):  # clones need gcc >= 11 on x86-64
            cmd = [compiler, *_FLAGS, *extra, "-o", str(built), str(source)]
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                os.replace(built, target)  # atomic: concurrent builders agree
                return True
    return False


@functools.cache
def load():
    """The compiled ``fastdp_philox_uniform_pairs``, or None where it cannot be built."""
    tag = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + platform.machine()).encode()).hexdigest()
    target = _cache_dir() / f"philox-{tag[:16]}.so"
    try:
        if not target.exists() and not _build(target):
            return None
        fn = ctypes.CDLL(str(target)).fastdp_philox_uniform_pairs
    except (OSError, subprocess.SubprocessError):
        return None
    fn.argtypes = [ctypes.c_uint32, ctypes.c_int64] + [ctypes.c_uint32] * 5 + [ctypes.c_void_p] * 2
    fn.restype = None
    return fn
