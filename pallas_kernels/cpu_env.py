"""Malloc settings that the CPU grouped matmul needs to run at its speed.

Why: XLA:CPU allocates every large result afresh, and glibc's default
malloc serves large blocks with new mmap'd 4 KiB pages and unmaps them on
free, so every step page-faults through them again. tgmm's [G, k, n]
result is G times a dense matmul's (128 MB in float32 at G=64, k=512,
n=1024): zero-filling its fresh pages costs about as much as the products.

What: importing `pallas_kernels` calls `configure_malloc()`, which sets,
through mallopt(3) in the running process:

  M_ARENA_MAX=1          every thread allocates from the main heap. XLA:CPU's
                         worker threads allocate the results, and a thread's
                         own arena serves any block over 64 MiB (its heap
                         size) with a fresh mmap, however it is tuned.
  M_MMAP_MAX=0           no block gets a mapping of its own: large blocks
                         come from the heap, and a freed block is reused by
                         the next step's allocation of that size, its pages
                         already faulted in.
  M_TRIM_THRESHOLD=-1    the heap's top is never given back to the kernel
                         (it would be faulted in again on the next step).
  M_TOP_PAD=64 MiB       the heap grows in steps of at least 64 MiB.
  M_MMAP_THRESHOLD=32 MiB  a fixed threshold (glibc's dynamic one moves with
                         the order in which threads free blocks), for a
                         user who keeps mmap on through glibc.malloc.mmap_max.

With them a step of the gmm fwd+bwd at G=64 takes no page faults (plain
process: ~34,000 minor faults per call, 0 with these settings). The price:
the heap keeps the process's peak size (memory the program frees stays with
the process for reuse), and all threads share one malloc lock.

When: the settings must be in place before JAX's CPU backend starts its
worker threads (at the first computation or `jax.devices()`): a thread that
has already allocated keeps its own arena, and its large results stay on
fresh pages. Importing `pallas_kernels` (or the moejax modules that use it)
before that is enough; importing `jax` first is fine. Imported later, it
still applies the settings and warns once that JAX started first.

Not applied (no-op) when MOEJAX_HUGEPAGES=0 or the C library is not glibc.
A parameter the user set through GLIBC_TUNABLES (glibc.malloc.arena_max,
.mmap_max, .trim_threshold, .top_pad, .mmap_threshold) or the matching
MALLOC_*_ environment variable keeps the user's value.

Huge pages for the heap: glibc puts large results on the heap (above), but
with the system's transparent-huge-page mode `madvise` (the common default)
the kernel backs it with 4 KiB pages, and at G=64 the grouped matmul's
fwd+bwd then spends ~10% more in TLB misses over its 128 MB buffers. So
`configure_malloc()` also grows the heap once by a block of virtual memory
(MOEJAX_HUGEPAGE_HEAP bytes, default 4 GiB, capped at half the machine's
memory; suffixes K/M/G), marks it MADV_HUGEPAGE and frees it back to the
heap, whose top is never trimmed: the later large allocations are carved
from it on huge pages. Nothing is touched, so memory is used only as the
program allocates (in 2 MiB units). It is what glibc's start-up tunable
`glibc.malloc.hugetlb=1` does, done in the running process. Skipped when
the tunables above are not all in place (the block could be unmapped
again), when the system's mode is `never`, or with MOEJAX_HUGEPAGE_HEAP=0;
`heap_reserved` says how many bytes it marked.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import warnings

OPT_OUT = "MOEJAX_HUGEPAGES"

# (name, mallopt parameter, value, GLIBC_TUNABLES name, legacy env variable)
_SETTINGS = (
    ("M_ARENA_MAX", -8, 1, "glibc.malloc.arena_max", "MALLOC_ARENA_MAX"),
    ("M_MMAP_MAX", -4, 0, "glibc.malloc.mmap_max", "MALLOC_MMAP_MAX_"),
    ("M_TRIM_THRESHOLD", -1, -1, "glibc.malloc.trim_threshold",
     "MALLOC_TRIM_THRESHOLD_"),
    ("M_TOP_PAD", -2, 64 << 20, "glibc.malloc.top_pad", "MALLOC_TOP_PAD_"),
    ("M_MMAP_THRESHOLD", -3, 32 << 20, "glibc.malloc.mmap_threshold",
     "MALLOC_MMAP_THRESHOLD_"),
)

THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

HEAP_ENV = "MOEJAX_HUGEPAGE_HEAP"
DEFAULT_HEAP = 4 << 30
MADV_HUGEPAGE = 14
_HUGE = 2 << 20

# What configure_malloc() set in this process ({name: value}); None before
# it ran. heap_reserved: bytes of heap marked for huge pages (0: none).
applied: dict[str, int] | None = None
heap_reserved = 0
_warned = False


def _is_glibc() -> bool:
  return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def malloc_settings(environ) -> dict[str, tuple[int, int]]:
  """{name: (mallopt parameter, value)} that configure_malloc() sets under `environ`."""
  if environ.get(OPT_OUT, "1") == "0" or not _is_glibc():
    return {}
  tunables = {t.split("=")[0] for t in environ.get("GLIBC_TUNABLES", "").split(":")
              if t}
  return {name: (param, value) for name, param, value, tunable, legacy in _SETTINGS
          if tunable not in tunables and legacy not in environ}


def _jax_started() -> bool:
  """Whether JAX's backends (and their threads) already exist."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # noqa: PLC0415 (jax is already imported)
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # noqa: BLE001 (a JAX without it: assume in time)
    return False


def heap_request(environ, mem_total: int | None) -> int:
  """Bytes of heap configure_malloc() marks for huge pages under `environ`.

  MOEJAX_HUGEPAGE_HEAP: a byte count with an optional K/M/G suffix (0: off);
  capped at half of `mem_total` (the machine's memory, when known).
  """
  raw = environ.get(HEAP_ENV, "").strip()
  if not raw:
    want = DEFAULT_HEAP
  else:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1].upper(), 1)
    digits = raw[:-1] if scale > 1 else raw
    if not digits.isdigit():
      raise ValueError(f"{HEAP_ENV}={raw!r} is invalid; allowed: a byte count "
                       "with an optional K, M or G suffix (0 turns it off), e.g. 4G")
    want = int(digits) * scale
  if mem_total:
    want = min(want, mem_total // 2)
  return want // _HUGE * _HUGE


def _mem_total() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    return None


def _thp_possible() -> bool:
  try:
    with open(THP_SETTING) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def _reserve_hugepage_heap(nbytes: int) -> int:
  """Grows the heap by `nbytes`, marks them MADV_HUGEPAGE, frees them; returns
  the bytes marked (0 if malloc or madvise refused)."""
  libc = ctypes.CDLL(None, use_errno=True)
  libc.malloc.argtypes, libc.malloc.restype = (ctypes.c_size_t,), ctypes.c_void_p
  libc.free.argtypes, libc.free.restype = (ctypes.c_void_p,), None
  libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
  libc.madvise.restype = ctypes.c_int
  p = libc.malloc(nbytes + _HUGE)
  if not p:
    return 0
  lo = (p + _HUGE - 1) // _HUGE * _HUGE
  hi = (p + nbytes + _HUGE) // _HUGE * _HUGE
  ok = libc.madvise(lo, hi - lo, MADV_HUGEPAGE) == 0
  libc.free(p)
  return hi - lo if ok else 0


def configure_malloc() -> dict[str, int]:
  """Applies the malloc settings (module docstring) to this process; returns them.

  Idempotent and safe at any time (mallopt takes malloc's lock); imports no
  JAX. Called by `import pallas_kernels`.
  """
  global applied, heap_reserved, _warned
  settings = malloc_settings(os.environ)
  first = applied is None
  done = {}
  if settings:
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for name, (param, value) in settings.items():
      if mallopt(param, value) == 1:
        done[name] = value
  applied = done
  # The block must come from the heap (no mmap) and stay there (no trim).
  if (first and {"M_MMAP_MAX", "M_TRIM_THRESHOLD"} <= done.keys()
      and _thp_possible()):
    nbytes = heap_request(os.environ, _mem_total())
    if nbytes:
      heap_reserved = _reserve_hugepage_heap(nbytes)
  if "M_ARENA_MAX" in done and not _warned and _jax_started():
    _warned = True
    warnings.warn(
        "pallas_kernels was imported after JAX's backend started: its worker "
        "threads keep their own malloc arenas, so large results (the CPU "
        "grouped matmul's weight gradients) come from fresh pages on every "
        "step, up to ~1.3x slower. Import pallas_kernels (or moejax) before "
        "the first JAX computation for the full speed (see "
        f"pallas_kernels/cpu_env.py; {OPT_OUT}=0 turns this off).",
        RuntimeWarning, stacklevel=3)
  return done
