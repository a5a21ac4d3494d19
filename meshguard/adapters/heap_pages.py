"""Transparent huge pages for the interpreter's heap: fewer TLB misses on a cold hop.

An idle ping's round trip through the tunnel crosses four cold hops (docs/datapath.md,
"Latency"): after an idle moment every hop runs interpreter code whose objects (code, types,
dicts, the peer's state) are spread over hundreds of 4 KiB pages of the heap, and on a
virtual machine each TLB miss is a two-level page walk that misses the caches too. Backed by
2 MiB pages, the same objects need a few dozen TLB entries. Measured here: about 11 us less
per cold hop in ``benchmarks/lone_hop.py``, and in ``benchmarks/hops.py`` (docs/datapath.md,
"Huge pages for the heap").

How: Python's own allocator takes its arenas with ``mmap`` and larger objects come from the C
heap, so neither can be asked for huge pages at allocation without the environment set before
the interpreter starts. Instead, once the node has started (its objects allocated), every
private writable anonymous mapping and the ``[heap]`` is advised ``MADV_HUGEPAGE`` (khugepaged
may then back it in the background, where the system's THP mode is ``madvise`` or ``always``)
and collapsed at once with ``MADV_COLLAPSE`` (Linux 6.1 and later; older kernels refuse it
with ``EINVAL`` and the advice alone remains). Only whole 2 MiB-aligned pages inside a mapping
are touched; a later pass takes what the heap grew by since. A system whose THP mode is
``never`` is left alone: that is the administrator's choice.

The cost is memory: a collapsed 2 MiB page is backed whole, where some of its 4 KiB pages had
never been touched. ``status()`` says how much was collapsed (``meshguard status``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable
from typing import Any

__all__ = ["HeapPages", "eligible_ranges", "thp_mode"]

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
#: The PMD page size on x86-64 and arm64 with 4 KiB pages; read from sysfs where it says.
DEFAULT_HUGE_PAGE = 2 << 20
_SYSFS = "/sys/kernel/mm/transparent_hugepage"

Madvise = Callable[[int, int, int], int]
"""``madvise(address, length, advice)``: 0, or an ``errno`` value (not raised)."""


def eligible_ranges(maps: str, huge_page: int) -> list[tuple[int, int]]:
    """The whole huge pages ``(start, length)`` inside the private writable anonymous
    mappings and the ``[heap]`` of a ``/proc/PID/maps`` text. Lines that do not parse are
    skipped (the text is the kernel's, but a parser takes nothing on trust)."""
    ranges: list[tuple[int, int]] = []
    if huge_page <= 0:
        return ranges
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[1] != "rw-p":
            continue
        path = fields[5].strip() if len(fields) == 6 else ""
        if path and path != "[heap]":
            continue
        low, sep, high = fields[0].partition("-")
        try:
            start, end = int(low, 16), int(high, 16)
        except ValueError:
            continue
        if not sep or end <= start:
            continue
        first = -(-start // huge_page) * huge_page
        last = end // huge_page * huge_page
        if last > first:
            ranges.append((first, last - first))
    return ranges


def thp_mode(read: Callable[[str], str] | None = None) -> str | None:
    """The system's THP mode (``always``, ``madvise``, ``never``), or None if unknown."""
    try:
        text = (read or _read)(f"{_SYSFS}/enabled")
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _huge_page_size(read: Callable[[str], str]) -> int:
    try:
        return int(read(f"{_SYSFS}/hpage_pmd_size"))
    except (OSError, ValueError):
        return DEFAULT_HUGE_PAGE


def _libc_madvise() -> Madvise | None:
    name = ctypes.util.find_library("c")
    try:
        libc: Any = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    call = libc.madvise
    call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    call.restype = ctypes.c_int

    def madvise(address: int, length: int, advice: int) -> int:
        if call(address, length, advice) == 0:
            return 0
        return ctypes.get_errno() or errno.EINVAL

    return madvise


class HeapPages:
    """Advise and collapse the process's heap into huge pages; call :meth:`advise` after
    start-up and now and then (a pass with nothing new reads ``/proc/self/maps`` only)."""

    def __init__(
        self,
        madvise: Madvise | None = None,
        read: Callable[[str], str] = _read,
        maps_path: str = "/proc/self/maps",
    ) -> None:
        self._madvise = madvise
        self._read = read
        self._maps_path = maps_path
        self.mode = thp_mode(read)
        self.huge_page = _huge_page_size(read)
        #: Huge page addresses already handled (collapsed or refused): not asked again.
        self._done: set[int] = set()
        self.passes = 0
        self.collapsed_bytes = 0
        self.advised_bytes = 0
        #: ``errno`` name -> bytes whose collapse was refused (EINVAL: a kernel before 6.1;
        #: EAGAIN/ENOMEM: no free huge page then; the advice stays either way).
        self.refused: dict[str, int] = {}
        self.disabled: str | None = None
        if self.mode == "never":
            self.disabled = "THP mode is never"
        elif self.mode is None:
            self.disabled = "no transparent huge pages in this kernel"

    def advise(self) -> int:
        """One pass over the mappings; the bytes collapsed in it."""
        if self.disabled is not None:
            return 0
        if self._madvise is None:
            self._madvise = _libc_madvise()
            if self._madvise is None:
                self.disabled = "no madvise in the C library"
                return 0
        try:
            maps = self._read(self._maps_path)
        except OSError as e:
            self.disabled = f"cannot read {self._maps_path}: {e.strerror}"
            return 0
        self.passes += 1
        page = self.huge_page
        collapsed = 0
        for start, length in eligible_ranges(maps, page):
            for run_start, run_length in self._new_runs(start, length):
                collapsed += self._advise_run(run_start, run_length)
        self.collapsed_bytes += collapsed
        return collapsed

    def _new_runs(self, start: int, length: int) -> list[tuple[int, int]]:
        """The stretches of ``[start, start + length)`` not handled before."""
        page = self.huge_page
        runs: list[tuple[int, int]] = []
        run_start: int | None = None
        for address in range(start, start + length, page):
            if address in self._done:
                if run_start is not None:
                    runs.append((run_start, address - run_start))
                    run_start = None
            elif run_start is None:
                run_start = address
        if run_start is not None:
            runs.append((run_start, start + length - run_start))
        return runs

    def _advise_run(self, start: int, length: int) -> int:
        madvise = self._madvise
        assert madvise is not None
        for address in range(start, start + length, self.huge_page):
            self._done.add(address)
        if madvise(start, length, MADV_HUGEPAGE) != 0:
            # Not a mapping any more (freed since the maps were read), or not advisable.
            return 0
        self.advised_bytes += length
        code = madvise(start, length, MADV_COLLAPSE)
        if code != 0:
            name = errno.errorcode.get(code, str(code))
            self.refused[name] = self.refused.get(name, 0) + length
            return 0
        return length

    def status(self) -> dict[str, Any]:
        """For ``meshguard status``: what was collapsed, what refused, or why nothing."""
        if self.disabled is not None:
            return {"disabled": self.disabled}
        status: dict[str, Any] = {
            "thp_mode": self.mode,
            "passes": self.passes,
            "advised_bytes": self.advised_bytes,
            "collapsed_bytes": self.collapsed_bytes,
        }
        if self.refused:
            status["refused_bytes"] = dict(self.refused)
        return status


def process_rss_bytes(read: Callable[[str], str] = _read) -> int | None:
    """This process's resident set size (for the log line after a pass)."""
    try:
        fields = read("/proc/self/statm").split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
