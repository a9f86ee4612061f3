"""Compressed exchanges: the codecs (bf16, int8 with a per-chunk scale) and their sizes.

A codec turns a floating-point vector into bytes and back; it knows nothing about who
sends what. The exchange rules that use it, with error feedback (what compression dropped is
carried into the next exchange, so nothing is lost over time), are in
:mod:`easgd.algorithms` (``compress_with_feedback_``, ``reduce_compressed_``).

* ``none``: the vector's own bytes (float32: 4 bytes per value).
* ``bf16``: round to nearest even bfloat16 (2 bytes per value; 8 significant bits).
* ``int8``: chunks of :data:`CHUNK` values, each with a float32 scale ``max|v| / 127`` and
  values ``round(v / scale)`` in [-127, 127] (1 + 4/CHUNK bytes per value).

Packed layout (``uint8``, what crosses the wire): bf16 is the bfloat16 array's bytes; int8 is
the chunks' float32 scales followed by the int8 values. Vectors are padded with zeros to a
whole number of chunks (:func:`padded`), so a shard boundary can fall on a chunk boundary.

The int8 codec of float32 CPU vectors runs in compiled kernels (``easgd._int8``, built from
``src/easgd/_int8.c`` at install, one pass over memory each way: encode + decode take 1.2x
one copy of the vector where eager PyTorch takes 3x), and so does the error feedback around
it (:meth:`Codec.feedback_`: ``compress_with_feedback_``'s four operations in one pass).
Every other dtype and device, and an install without a C compiler, run the same arithmetic
in eager PyTorch, bitwise the same; :data:`INT8_KERNEL` says which, and the first int8
exchange without the kernels warns once.
"""

from __future__ import annotations

import importlib
import math
import threading
import warnings
from collections.abc import Iterable
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["CHUNK", "CODECS", "INT8_KERNEL", "Codec", "codec", "padded"]

_kernels: ModuleType | None
try:
    _kernels = importlib.import_module("easgd._int8")  # built by setup.py
except ImportError:  # installed without a C compiler
    _kernels = None

#: How the int8 codec encodes and decodes float32 CPU vectors: ``"compiled"`` (the fused
#: kernels of ``easgd._int8``) or ``"eager"`` (PyTorch operations, about 2.5x slower).
INT8_KERNEL = "eager" if _kernels is None else "compiled"
_warned = False

#: Values per int8 chunk (one float32 scale each): 1.6% of overhead.
CHUNK = 256
#: Chunks per block of the int8 kernels: one block's temporaries (512 KiB of float32) stay in
#: a core's L2 cache across the five passes over them, so memory sees about one read of the
#: input and one write of the output (eager PyTorch has no fused kernel for this).
_BLOCK = 512


def padded(n: int, align: int = CHUNK) -> int:
    """``n`` rounded up to a multiple of ``align`` (default: a whole number of chunks)."""
    return math.ceil(n / align) * align


class Codec:
    """Encode a float vector into packed bytes and decode it back (see the module notes)."""

    name = "none"
    #: Vectors (and shards) this codec packs are multiples of this many values.
    align = 1

    def packed_size(self, n: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of ``n`` values (``n`` a multiple of :data:`CHUNK` for int8)."""
        return n * torch.empty((), dtype=dtype).element_size()

    def bytes_per_value(self) -> float:
        """Wire bytes per value of a float32 vector (the simulator's cost model)."""
        return self.packed_size(CHUNK) / CHUNK

    def encode(self, v: Tensor, out: Tensor) -> None:
        """Write ``v``'s packed form into ``out`` (``uint8``, :meth:`packed_size` bytes)."""
        out.view(v.dtype).copy_(v)

    def decode(self, packed: Tensor, out: Tensor) -> None:
        """Write the values that ``packed`` holds into ``out`` (any float dtype)."""
        out.copy_(packed.view(out.dtype))

    def feedback_(self, v: Tensor, residual: Tensor, packed: Tensor) -> bool:
        """:func:`easgd.algorithms.compress_with_feedback_` in one fused pass, where this
        codec has a kernel for ``v`` and ``residual``; False (nothing done) where it has none."""
        return False


class _BF16(Codec):
    name = "bf16"

    def packed_size(self, n: int, dtype: torch.dtype = torch.float32) -> int:
        return 2 * n

    def encode(self, v: Tensor, out: Tensor) -> None:
        out.view(torch.bfloat16).copy_(v)  # round to nearest even

    def decode(self, packed: Tensor, out: Tensor) -> None:
        out.copy_(packed.view(torch.bfloat16))


class _Int8(Codec):
    name = "int8"
    align = CHUNK

    def packed_size(self, n: int, dtype: torch.dtype = torch.float32) -> int:
        if n % CHUNK:
            raise ValueError(f"int8 packs whole chunks of {CHUNK} values, got {n}")
        return n + 4 * (n // CHUNK)

    def _split(self, packed: Tensor, n: int) -> tuple[Tensor, Tensor]:
        # Checked here for both paths: the compiled kernels write what the sizes say.
        if n % CHUNK:
            raise ValueError(
                f"int8 packs whole chunks of {CHUNK} values, got a vector of {n} "
                "(pad it with easgd.compress.padded)"
            )
        if packed.dtype != torch.uint8 or packed.numel() != self.packed_size(n):
            raise ValueError(
                f"int8 packs {n} values into {self.packed_size(n)} uint8 bytes, got a buffer "
                f"of {packed.numel()} {packed.dtype} (size it with Codec.packed_size)"
            )
        chunks = n // CHUNK
        scales = packed[: 4 * chunks].view(torch.float32)
        return scales, packed[4 * chunks :].view(torch.int8).view(chunks, CHUNK)

    def encode(self, v: Tensor, out: Tensor) -> None:
        scales, q = self._split(out, v.numel())
        kernels = _compiled(v, out)
        if kernels is not None:
            kernels.encode(v.data_ptr(), scales.numel(), scales.data_ptr(), q.data_ptr())
            return
        t, inv, peak = _scratch(v.dtype)
        for r, s, qb in _blocks(v.view(-1, CHUNK), scales, q):
            k = r.shape[0]
            tb, ib = (t, inv) if k == _BLOCK else (t[:k], inv[:k])
            torch.abs(r, out=tb)  # max |v| per chunk (the block stays in cache for what follows)
            if peak is None:
                torch.amax(tb, 1, out=s)
            else:
                s.copy_(torch.amax(tb, 1, out=peak[:k]))
            # 127 / max|v| (as 127 * (1 / max|v|)); 0 where that is not finite: all-zero chunks
            # (q = 0, scale 0) and a max|v| so small that 127 / max|v| overflows
            torch.reciprocal(s, out=ib[:, 0]).mul_(127.0).nan_to_num_(nan=0.0, posinf=0.0)
            torch.mul(r, ib if peak is None else ib.to(v.dtype), out=tb)
            qb.copy_(tb.round_())  # |v| * 127 / max|v| <= 127: no clamp needed
        scales.div_(127.0)

    def decode(self, packed: Tensor, out: Tensor) -> None:
        scales, q = self._split(packed, out.numel())
        kernels = _compiled(out, packed)
        if kernels is not None:
            kernels.decode(scales.data_ptr(), q.data_ptr(), scales.numel(), out.data_ptr())
            return
        for o, qb, s in _blocks(out.view(-1, CHUNK), q, scales.to(out.dtype)[:, None]):
            o.copy_(qb)
            o.mul_(s)

    def feedback_(self, v: Tensor, residual: Tensor, packed: Tensor) -> bool:
        scales, q = self._split(packed, v.numel())
        kernels = _compiled(v, packed)
        if kernels is None or not _separate(v, residual):
            return False
        kernels.feedback(v.data_ptr(), residual.data_ptr(), scales.numel(), scales.data_ptr(),
                         q.data_ptr())  # fmt: skip
        return True


def _separate(v: Tensor, residual: Tensor) -> bool:
    """Whether ``residual`` is a contiguous float32 buffer of ``v``'s size that shares no
    memory with it (what the fused feedback kernel takes; else the eager code runs)."""
    same = residual.dtype == v.dtype and residual.shape == v.shape and residual.device == v.device
    if not same or not residual.is_contiguous():
        return False
    size = v.numel() * v.element_size()
    a, b = v.data_ptr(), residual.data_ptr()
    return a + size <= b or b + size <= a


def _compiled(v: Tensor, packed: Tensor) -> ModuleType | None:
    """The compiled kernels if they serve this float32 vector and its packed bytes (contiguous,
    on the CPU), else None; warns once if they would but were not built."""
    global _warned
    if v.dtype != torch.float32 or v.device.type != "cpu":
        return None
    if _kernels is None:
        if not _warned:
            _warned = True
            warnings.warn(
                "easgd._int8 is not built (easgd was installed without a C compiler): the "
                "int8 codec runs in eager PyTorch, the same bytes about 2.5x slower; install "
                "a C compiler (gcc or clang) and reinstall easgd to build it",
                RuntimeWarning, stacklevel=4,
            )  # fmt: skip
        return None
    return _kernels if v.is_contiguous() and packed.is_contiguous() else None


def _blocks(*rows: Tensor) -> Iterable[tuple[Tensor, ...]]:
    """The same blocks of :data:`_BLOCK` chunks of each of ``rows`` (one per chunk)."""
    if rows[0].shape[0] <= _BLOCK:
        return (rows,)
    return zip(*(r.split(_BLOCK) for r in rows), strict=True)


_local = threading.local()


def _scratch(dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """This thread's int8 block buffers for ``dtype`` vectors (server sessions encode in their
    own threads): the block, its column of 127 / max|v| (float32) and, unless ``dtype`` is
    float32 (whose max|v| go straight to the scales), its max|v|."""
    cache: dict[torch.dtype, tuple[Tensor, Tensor, Tensor | None]]
    cache = _local.__dict__.setdefault("c", {})
    found = cache.get(dtype)
    if found is None:
        block = torch.empty(_BLOCK, CHUNK, dtype=dtype)
        peak = None if dtype == torch.float32 else torch.empty(_BLOCK, dtype=dtype)
        found = cache[dtype] = (block, torch.empty(_BLOCK, 1), peak)
    return found


CODECS: dict[str, Codec] = {c.name: c for c in (Codec(), _BF16(), _Int8())}


def codec(name: str) -> Codec:
    """The codec called ``name`` (``none``, ``bf16`` or ``int8``)."""
    found = CODECS.get(name)
    if found is None:
        raise ValueError(f"compress={name!r}; choose one of {', '.join(CODECS)}")
    return found
