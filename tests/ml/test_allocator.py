import ctypes
import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.ml import allocator

# A fresh interpreter mallocs 16 MiB and says whether glibc served it with its own mmap (mallinfo2's hblks count
# them), after calling `keep_freed_memory` or not.
PROBE = """
import ctypes, sys
from server.ml.allocator import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
if sys.argv[1] == "kept":
    print(keep_freed_memory(), file=sys.stderr)
before = libc.mallinfo2().hblks
block = libc.malloc(16 * 2**20)
print(libc.mallinfo2().hblks - before)
"""


def mapped_blocks(mode: str, **env: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "", **env},
        cwd=Path(__file__).parents[2],
    )
    return int(done.stdout)


needs_glibc = pytest.mark.skipif(allocator.platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")


@needs_glibc
def test_a_large_allocation_comes_from_the_heap_once_freed_memory_is_kept():
    assert mapped_blocks("default") == 1  # glibc's own default: an mmap of its own, unmapped when freed
    assert mapped_blocks("kept") == 0


@needs_glibc
def test_settings_in_the_environment_are_left_as_they_are(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert allocator.keep_freed_memory() == "left as the environment sets it (MALLOC_MMAP_THRESHOLD_)"
    assert mapped_blocks("kept", MALLOC_MMAP_THRESHOLD_="65536") == 1


def test_another_c_library_is_left_as_it_is(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", ""))
    assert allocator.keep_freed_memory() == "left as it is (not glibc)"


@needs_glibc
def test_glibc_says_what_it_kept():
    assert allocator.keep_freed_memory().startswith("freed memory kept (mmap threshold 32 MiB")


SMAPS = """\
55d0c0000000-55d0c0400000 rw-p 00000000 00:00 0                          [heap]
Size:               4096 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000800000 rw-p 00000000 00:00 0
Size:               8192 kB
THPeligible:           0
VmFlags: rd wr mr mw me ac
7f0000800000-7f0001000000 rw-p 00000000 00:00 0
VmFlags: rd wr mr mw me ac nh
7f0001000000-7f0001400000 rw-p 00001000 08:01 1234                       /usr/lib/libtorch_cpu.so
VmFlags: rd wr mr mw me ac
7f0001400000-7f0001800000 r--p 00000000 00:00 0
VmFlags: rd mr mw me ac
7ffc00000000-7ffc00400000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
"""


def test_only_private_writable_anonymous_memory_that_may_be_on_huge_pages_is_a_candidate():
    # The heap and an anonymous mmap; not a thread stack marked `nh`, a file, read-only memory or the main stack.
    assert allocator.anonymous_ranges(SMAPS) == [(0x55D0C0000000, 0x55D0C0400000), (0x7F0000000000, 0x7F0000800000)]


def test_new_memory_is_what_no_earlier_mapping_covered_in_whole_huge_pages():
    mib = 2**20
    before = [(0, 10 * mib), (20 * mib, 21 * mib)]
    after = [(0, 13 * mib), (20 * mib, 21 * mib), (30 * mib + 4096, 35 * mib)]
    # The heap grew by 3 MiB (one whole 2 MiB page in it), a mapping stayed, a new one starts off a page boundary.
    assert allocator.new_ranges(before, after) == [(10 * mib, 12 * mib), (32 * mib, 34 * mib)]
    assert allocator.new_ranges(after, after) == []


def test_the_systems_switch_set_to_never_leaves_memory_as_it_is(tmp_path):
    switch = tmp_path / "enabled"
    switch.write_text("always madvise [never]\n")
    summary = allocator.collapse([(0, 4 * 2**20)], switch)
    assert summary.startswith("left on 4 KiB pages (4 MiB)") and "never" in summary
    assert allocator.collapse([], switch).startswith("nothing to move")


def huge_kib(address: int) -> int:
    """AnonHugePages of the mapping that holds `address` in this process."""
    lines = allocator.SMAPS.read_text().splitlines()
    for index, line in enumerate(lines):
        fields = line.split()
        if not fields[0].endswith(":"):
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            if low <= address < high:
                huge = next(entry for entry in lines[index + 1 :] if entry.startswith("AnonHugePages:"))
                return int(huge.split()[1])
    raise LookupError(hex(address))


collapsible = pytest.mark.skipif(
    allocator.platform.system() != "Linux"
    or tuple(int(part) for part in allocator.platform.release().split(".")[:2]) < (6, 1)
    or not allocator.THP_SWITCH.exists()
    or "[never]" in allocator.THP_SWITCH.read_text(),
    reason="MADV_COLLAPSE: Linux 6.1 or later, transparent huge pages not off",
)


@collapsible
def test_memory_allocated_in_the_block_ends_on_huge_pages():
    import torch

    with allocator.on_huge_pages() as pages:
        weights = torch.ones(64 * 2**20 // 4)
    if any(busy in pages.summary for busy in (os.strerror(errno.EAGAIN), os.strerror(errno.ENOMEM))):
        pytest.skip(f"the kernel found no free 2 MiB page here: {pages.summary}")
    assert huge_kib(weights.data_ptr() + weights.nbytes // 2) >= 2048
    assert re.fullmatch(r"(\d+) of \1 MiB moved to 2 MiB pages in [\d.]+ s \(MADV_COLLAPSE\)", pages.summary)
    assert float(weights.sum()) == weights.numel()  # the contents moved with the pages


class ScriptedLibc:
    """madvise answering from a script of errors (0: success), as ctypes reports them."""

    def __init__(self, *errors: int):
        self.errors, self.calls = list(errors), 0

    def madvise(self, address: int, length: int, advice: int) -> int:
        self.calls += 1
        ctypes.set_errno(error := self.errors.pop(0))
        return -1 if error else 0


@pytest.mark.parametrize(
    ("script", "result", "calls"),
    [
        ((errno.EAGAIN, errno.EAGAIN, 0), 0, 3),  # transient: tried again
        ((errno.EAGAIN,) * 3, errno.EAGAIN, 3),  # but not forever
        ((errno.EINVAL, 0), errno.EINVAL, 1),  # a kernel without MADV_COLLAPSE: no second try
    ],
)
def test_a_collapse_is_tried_again_only_when_the_kernel_says_try_again(script, result, calls):
    libc = ScriptedLibc(*script)
    assert allocator._collapse_one(libc, 0, 2**21) == result and libc.calls == calls
