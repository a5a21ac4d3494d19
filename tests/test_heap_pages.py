"""The heap in huge pages: which mappings are advised, what is asked of the kernel, when."""

from __future__ import annotations

import errno
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshguard.adapters import heap_pages
from meshguard.adapters.heap_pages import (
    MADV_COLLAPSE,
    MADV_HUGEPAGE,
    HeapPages,
    eligible_ranges,
    thp_mode,
)
from meshguard.app.service import HEAP_PAGES_PERIOD, HEAP_PAGES_SETTLE, NodeService

MIB = 1 << 20
HUGE = 2 * MIB

MAPS = """\
55d0c0000000-55d0c0400000 r-xp 00000000 08:01 123 /usr/bin/python3.11
55d0c0600000-55d0c0a00000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000500000 rw-p 00000000 00:00 0
7f0000600000-7f0000700000 rw-p 00000000 00:00 0
7f0000800000-7f0000c00000 rw-p 00000000 08:01 456 /usr/lib/libfoo.so
7f0001000000-7f0001400000 rw-s 00000000 00:01 789 /dev/zero (deleted)
7f0002000000-7f0002400000 r--p 00000000 00:00 0
7ffc00000000-7ffc00400000 rw-p 00000000 00:00 0 [stack]
garbage line
7f00-zz rw-p 0 0 0
"""


def sysfs(mode: str = "madvise") -> dict[str, str]:
    return {
        "/sys/kernel/mm/transparent_hugepage/enabled": {
            "always": "[always] madvise never\n",
            "madvise": "always [madvise] never\n",
            "never": "always madvise [never]\n",
        }[mode],
        "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size": f"{HUGE}\n",
        "/proc/self/maps": MAPS,
    }


class Files:
    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def __call__(self, path: str) -> str:
        if path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "No such file", path)
        return self.files[path]


class Kernel:
    """A fake ``madvise``: records calls, refuses what it is told to."""

    def __init__(self, collapse_error: int = 0, advise_error: int = 0) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.collapse_error = collapse_error
        self.advise_error = advise_error

    def __call__(self, address: int, length: int, advice: int) -> int:
        self.calls.append((address, length, advice))
        if advice == MADV_HUGEPAGE:
            return self.advise_error
        return self.collapse_error


class EligibleRangesTests(SynchronousTestCase):
    def test_private_writable_anonymous_and_heap_only(self) -> None:
        """The heap and anonymous private writable mappings, cut to whole huge pages; file
        mappings, shared, read-only, the stack and lines that do not parse are left out."""
        self.assertEqual(
            eligible_ranges(MAPS, HUGE),
            [(0x55D0C0600000, 4 * MIB), (0x7F0000000000, 4 * MIB)],
        )

    def test_nothing_without_a_page_size(self) -> None:
        self.assertEqual(eligible_ranges(MAPS, 0), [])

    @given(st.text(max_size=400), st.sampled_from([4096, HUGE, 3]))
    def test_any_text_gives_aligned_ranges_or_none(self, text: str, page: int) -> None:
        """Whatever the text, no exception, and every range is whole aligned pages."""
        for start, length in eligible_ranges(text, page):
            self.assertEqual(start % page, 0)
            self.assertGreater(length, 0)
            self.assertEqual(length % page, 0)

    @given(
        st.integers(0, 1 << 40),
        st.integers(1, 64 * MIB),
        st.sampled_from(["", "[heap]", "/lib/x.so", "[stack]"]),
    )
    def test_ranges_lie_inside_their_mapping(self, start: int, size: int, path: str) -> None:
        line = f"{start:x}-{start + size:x} rw-p 00000000 00:00 0 {path}\n"
        for first, length in eligible_ranges(line, HUGE):
            self.assertIn(path, ("", "[heap]"))
            self.assertGreaterEqual(first, start)
            self.assertLessEqual(first + length, start + size)


class HeapPagesTests(SynchronousTestCase):
    def test_advises_then_collapses_each_range_once(self) -> None:
        kernel = Kernel()
        pages = HeapPages(kernel, read=Files(sysfs()))
        self.assertEqual(pages.advise(), 8 * MIB)
        self.assertEqual(
            kernel.calls,
            [
                (0x55D0C0600000, 4 * MIB, MADV_HUGEPAGE),
                (0x55D0C0600000, 4 * MIB, MADV_COLLAPSE),
                (0x7F0000000000, 4 * MIB, MADV_HUGEPAGE),
                (0x7F0000000000, 4 * MIB, MADV_COLLAPSE),
            ],
        )
        kernel.calls.clear()
        self.assertEqual(pages.advise(), 0)  # nothing new: nothing asked
        self.assertEqual(kernel.calls, [])
        self.assertEqual(
            pages.status(),
            {
                "thp_mode": "madvise",
                "passes": 2,
                "advised_bytes": 8 * MIB,
                "collapsed_bytes": 8 * MIB,
            },
        )

    def test_a_grown_mapping_gives_only_its_new_pages(self) -> None:
        files = sysfs()
        kernel = Kernel()
        pages = HeapPages(kernel, read=Files(files))
        pages.advise()
        kernel.calls.clear()
        files["/proc/self/maps"] = MAPS.replace(
            "7f0000000000-7f0000500000", "7f0000000000-7f0000a00000"
        )
        self.assertEqual(pages.advise(), 6 * MIB)
        self.assertEqual(
            kernel.calls,
            [
                (0x7F0000400000, 6 * MIB, MADV_HUGEPAGE),
                (0x7F0000400000, 6 * MIB, MADV_COLLAPSE),
            ],
        )

    def test_a_refused_collapse_is_counted_and_not_retried(self) -> None:
        """A kernel before 6.1 refuses MADV_COLLAPSE (EINVAL): the advice stays (khugepaged
        may still do it), the refusal is counted, and the range is not asked again."""
        kernel = Kernel(collapse_error=errno.EINVAL)
        pages = HeapPages(kernel, read=Files(sysfs()))
        self.assertEqual(pages.advise(), 0)
        self.assertEqual(pages.status()["refused_bytes"], {"EINVAL": 8 * MIB})
        self.assertEqual(pages.status()["advised_bytes"], 8 * MIB)
        kernel.calls.clear()
        pages.advise()
        self.assertEqual(kernel.calls, [])

    def test_a_range_that_cannot_be_advised_is_not_collapsed(self) -> None:
        kernel = Kernel(advise_error=errno.ENOMEM)
        pages = HeapPages(kernel, read=Files(sysfs()))
        self.assertEqual(pages.advise(), 0)
        self.assertEqual([c[2] for c in kernel.calls], [MADV_HUGEPAGE, MADV_HUGEPAGE])
        self.assertEqual(pages.status()["advised_bytes"], 0)

    def test_thp_never_is_left_alone(self) -> None:
        """The administrator turned THP off: nothing is advised (MADV_COLLAPSE would ignore
        that setting)."""
        kernel = Kernel()
        pages = HeapPages(kernel, read=Files(sysfs("never")))
        self.assertEqual(pages.advise(), 0)
        self.assertEqual(kernel.calls, [])
        self.assertEqual(pages.status(), {"disabled": "THP mode is never"})

    def test_no_thp_in_the_kernel(self) -> None:
        files = sysfs()
        del files["/sys/kernel/mm/transparent_hugepage/enabled"]
        pages = HeapPages(Kernel(), read=Files(files))
        self.assertEqual(pages.advise(), 0)
        self.assertIn("disabled", pages.status())

    def test_unreadable_maps_disable_it(self) -> None:
        files = sysfs("always")
        del files["/proc/self/maps"]
        pages = HeapPages(Kernel(), read=Files(files))
        self.assertEqual(pages.advise(), 0)
        self.assertIn("/proc/self/maps", pages.status()["disabled"])

    def test_thp_mode_reads_the_bracketed_word(self) -> None:
        self.assertEqual(thp_mode(Files(sysfs("always"))), "always")
        self.assertIsNone(thp_mode(Files({})))
        self.assertIsNone(thp_mode(Files({"/sys/kernel/mm/transparent_hugepage/enabled": "odd"})))

    def test_this_process_for_real(self) -> None:
        """The real ``madvise`` on this process: no exception, and on a kernel with THP the
        pass either collapsed something or says why not."""
        pages = HeapPages()
        collapsed = pages.advise()
        status = pages.status()
        if "disabled" in status:
            return
        self.assertEqual(status["passes"], 1)
        self.assertEqual(status["collapsed_bytes"], collapsed)
        self.assertTrue(collapsed or status.get("refused_bytes") or not status["advised_bytes"])
        self.assertIsNotNone(heap_pages.process_rss_bytes())


class ServicePassesTests(SynchronousTestCase):
    def test_passes_are_scheduled_and_stop_with_the_service(self) -> None:
        """The service runs a pass HEAP_PAGES_SETTLE s after start, then every
        HEAP_PAGES_PERIOD s; stopping cancels the next; a disabled one is not rescheduled."""
        clock = Clock()
        kernel = Kernel()
        pages = HeapPages(kernel, read=Files(sysfs()))
        service: Any = NodeService("mgh0", None, reactor=clock, heap_pages=pages)
        service._heap_call = clock.callLater(HEAP_PAGES_SETTLE, service._heap_pages_pass)
        clock.advance(HEAP_PAGES_SETTLE)
        self.assertEqual(pages.passes, 1)
        clock.advance(HEAP_PAGES_PERIOD)
        self.assertEqual(pages.passes, 2)
        self.assertTrue(service._heap_call.active())
        service.running = True
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        off = HeapPages(Kernel(), read=Files(sysfs("never")))
        service = NodeService("mgh1", None, reactor=clock, heap_pages=off)
        service._heap_pages_pass()
        self.assertIsNone(service._heap_call)
