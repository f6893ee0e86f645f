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
