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
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

__all__ = ["CHUNK", "CODECS", "Codec", "codec", "padded"]

#: Values per int8 chunk (one float32 scale each): 1.6% of overhead.
CHUNK = 256


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
        chunks = n // CHUNK
        scales = packed[: 4 * chunks].view(torch.float32)
        return scales, packed[4 * chunks :].view(torch.int8).view(chunks, CHUNK)

    def encode(self, v: Tensor, out: Tensor) -> None:
        n = v.numel()
        scales, q = self._split(out, n)
        rows = v.view(-1, CHUNK)
        # max |v| per chunk without materializing |v| (two reads instead of a write + read)
        amax = torch.maximum(rows.amax(1), rows.amin(1).neg_()).float()
        torch.div(amax, 127.0, out=scales)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)).to(v.dtype)
        tmp = _scratch(rows.shape, v.dtype)
        torch.mul(rows, inv[:, None], out=tmp)
        q.copy_(tmp.round_())  # |v| * 127 / max|v| <= 127: no clamp needed

    def decode(self, packed: Tensor, out: Tensor) -> None:
        scales, q = self._split(packed, out.numel())
        rows = out.view(-1, CHUNK)
        rows.copy_(q)
        rows.mul_(scales.to(out.dtype)[:, None])


_local = threading.local()


def _scratch(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """A per-thread scratch buffer (server sessions encode in their own threads)."""
    cache: dict[tuple[torch.Size, torch.dtype], Tensor] = _local.__dict__.setdefault("c", {})
    key = (shape, dtype)
    if key not in cache:
        if len(cache) > 8:
            cache.clear()
        cache[key] = torch.empty(shape, dtype=dtype)
    return cache[key]


CODECS: dict[str, Codec] = {c.name: c for c in (Codec(), _BF16(), _Int8())}


def codec(name: str) -> Codec:
    """The codec called ``name`` (``none``, ``bf16`` or ``int8``)."""
    found = CODECS.get(name)
    if found is None:
        raise ValueError(f"compress={name!r}; choose one of {', '.join(CODECS)}")
    return found
