"""Frame bodies through shared memory, between a worker and a parameter server on one host.

Over loopback TCP every body is copied into the kernel and out again on each side, and
hashed twice for its tags: a 4.6M-parameter exchange costs the two processes about 50 ms of
CPU, against 2 ms for one copy of the vector (``benchmarks/RESULTS.md``, section 14). When
both ends are on one host, a :class:`Segment` (an anonymous ``memfd`` the server creates for
the session) carries the bodies instead; the frames themselves (headers, tags, a small
descriptor) still go through the socket, so the protocol, its order and its deadlines are
unchanged (:class:`easgd.comm.wire.Channel`).

Layout of a segment (``size`` = the shard's bytes, pages rounded)::

    [0, 32)                token (32 random bytes, written by the server)
    [64, 80)   c2s counters  published, consumed (uint64)
    [128, 144) s2c counters
    [4096, 4096 + size)               c2s body (worker -> server)
    [4096 + size, 4096 + 2 size)      s2c body (server -> worker)

Who can reach it: the segment has no name; the worker opens it as ``/proc/<pid>/fd/<fd>``
of the server, which the kernel allows only to processes of the same user (or with
``CAP_SYS_PTRACE``), who can read both processes' memory anyway. Negotiation, over the
session's authenticated frames (``Cmd.SHM``): the server offers ``pid``, ``fd``, ``size``
and ``sha256(token)``; the worker opens that file, checks that it is the server's memfd of
that size and that its token has that digest (a file of another host or process never
matches, and is never written), and proves that it mapped the same memory by sending the
token back. Either side may decline (another host, TLS, ``shm=False``, no ``memfd``), and
the session then stays on TCP: nothing but the speed differs.

Pages are touched only when bodies are written: a session that never exchanges holds no
shard-sized memory (the worker asks for a segment at its first tensor body, not at JOIN).
The server's session buffers *are* the segment's bodies (zero copies on that side); the
worker copies its payload in and its reply out (one pass each, with the GIL released).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import mmap
import os
import stat
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SHM_ENV",
    "SHM_MIN",
    "Region",
    "Segment",
    "ShmUnavailable",
    "is_loopback",
    "resolve_shm",
]

logger = logging.getLogger(__name__)

SHM_ENV = "EASGD_SHM"  # "0" turns shared memory off where shm= is not given
SHM_MIN = 1 << 16  # bytes: a smaller body goes through the socket (a copy costs less than a
# round of descriptors)
_PAGE = 4096
_TOKEN = 32
_NAME = "easgd-ps"
_C2S_COUNTERS, _S2C_COUNTERS = 64, 128  # offsets of each direction's two uint64 counters


class ShmUnavailable(OSError):
    """This pair of processes cannot share a segment (the session stays on TCP)."""


def resolve_shm(shm: bool | None) -> bool:
    """``shm``, else ``EASGD_SHM`` (``0`` or ``1``), else True."""
    if shm is not None:
        return bool(shm)
    value = os.environ.get(SHM_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{SHM_ENV}={value!r}: use 1 (shared memory on one host) or 0 (TCP)")
    return value == "1"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address: ``localhost``, 127.0.0.0/8, ``::1`` (also
    IPv4 mapped into IPv6). Where a server may run without a secret, and a session share
    memory."""
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


class Region:
    """One direction's body area and its two counters: ``published`` (bodies the sender put
    here) and ``consumed`` (bodies the receiver verified); the sender writes a body only
    when the two are equal, so it never overwrites one that is still being read."""

    def __init__(self, buf: mmap.mmap, counters: int, start: int, size: int) -> None:
        self._counters = memoryview(buf)[counters : counters + 16].cast("Q")
        self.array = np.frombuffer(buf, np.uint8, size, start)
        self.size = size
        self.address = int(self.array.ctypes.data)

    @property
    def published(self) -> int:
        return int(self._counters[0])

    @published.setter
    def published(self, value: int) -> None:
        self._counters[0] = value

    @property
    def consumed(self) -> int:
        return int(self._counters[1])

    @consumed.setter
    def consumed(self, value: int) -> None:
        self._counters[1] = value

    @property
    def free(self) -> bool:
        return self.published == self.consumed

    def write(self, offset: int, data: Any) -> None:
        """``data`` to ``[offset, offset + len)``; nothing to do when it already lies there."""
        src = np.frombuffer(data, np.uint8)
        if src.size and int(src.ctypes.data) != self.address + offset:
            np.copyto(self.array[offset : offset + src.size], src)

    def read(self, offset: int, view: memoryview) -> None:
        """``[offset, offset + len(view))`` into ``view`` (none when it is that memory)."""
        dst = np.frombuffer(view, np.uint8)
        if dst.size and int(dst.ctypes.data) != self.address + offset:
            np.copyto(dst, self.array[offset : offset + dst.size])

    def tensor(self, numel: int, dtype: torch.dtype) -> Tensor:
        """The body area as a tensor (the server's session buffers: no copy on its side)."""
        return torch.frombuffer(self.array, dtype=dtype, count=numel)


class Segment:
    """The memory a worker and a server share for one session (module docstring)."""

    def __init__(self, buf: mmap.mmap, size: int, token: bytes, fd: int | None) -> None:
        self._buf = buf
        self.size = size
        self.token = token
        self._fd = fd
        start = _PAGE
        self.c2s = Region(buf, _C2S_COUNTERS, start, size)
        self.s2c = Region(buf, _S2C_COUNTERS, start + _rounded(size), size)

    @staticmethod
    def _length(size: int) -> int:
        return _PAGE + 2 * _rounded(size)

    @classmethod
    def create(cls, size: int) -> Segment:
        """The server's side: a new memfd for bodies of up to ``size`` bytes (sparse: pages
        are allocated as bodies are written). Raises :class:`ShmUnavailable`."""
        if size <= 0:
            raise ShmUnavailable(f"a segment for bodies of {size} bytes")
        if not hasattr(os, "memfd_create"):
            raise ShmUnavailable("this system has no memfd_create (Linux only)")
        try:
            fd = os.memfd_create(_NAME, os.MFD_CLOEXEC)
        except OSError as exc:
            raise ShmUnavailable(f"memfd_create failed: {exc}") from exc
        try:
            os.ftruncate(fd, cls._length(size))
            buf = mmap.mmap(fd, cls._length(size))
        except BaseException:
            os.close(fd)
            raise
        token = os.urandom(_TOKEN)
        buf[:_TOKEN] = token
        return cls(buf, size, token, fd)

    def offer(self) -> dict[str, Any]:
        """What the server tells the worker (over the authenticated frames)."""
        assert self._fd is not None, "offered after close_fd"
        return {"pid": os.getpid(), "fd": self._fd, "size": self.size,
                "digest": hashlib.sha256(self.token).hexdigest()}  # fmt: skip

    @classmethod
    def open(cls, offer: Any) -> Segment:
        """The worker's side: map the segment the server offered, after checking that it
        is that segment (nothing is written to a file that fails a check)."""
        try:
            pid, fd, size, digest = (offer[k] for k in ("pid", "fd", "size", "digest"))
            pid, fd, size, digest = int(pid), int(fd), int(size), str(digest)
        except (KeyError, TypeError, ValueError) as exc:
            raise ShmUnavailable(f"a malformed shared-memory offer: {offer!r}") from exc
        path = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(path)
        except OSError as exc:
            raise ShmUnavailable(f"cannot see the server's segment {path}: {exc}") from exc
        if not target.startswith(f"/memfd:{_NAME}"):
            raise ShmUnavailable(f"{path} is {target!r}, not the server's segment")
        try:
            own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ShmUnavailable(f"cannot open the server's segment {path}: {exc}") from exc
        try:
            info = os.fstat(own)
            if not stat.S_ISREG(info.st_mode) or info.st_size != cls._length(size):
                raise ShmUnavailable(
                    f"{path} has {info.st_size} bytes, the offer says {cls._length(size)}"
                )
            buf = mmap.mmap(own, cls._length(size))
        finally:
            os.close(own)  # the mapping stays
        token = bytes(buf[:_TOKEN])
        if not hmac.compare_digest(hashlib.sha256(token).hexdigest(), digest):
            buf.close()
            raise ShmUnavailable(f"{path} is not the segment the server offered (token)")
        return cls(buf, size, token, None)

    def close_fd(self) -> None:
        """The server's descriptor, once the worker mapped the segment (or declined it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _rounded(size: int) -> int:
    return -(-size // _PAGE) * _PAGE
