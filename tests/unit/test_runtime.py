import subprocess
import sys

import pytest

# Whether glibc serves a 64 MiB block (a batch's activations) from its own mmap: then freeing it
# unmaps it and the next batch page-faults it back in.
PROBE = """
import ctypes, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
if sys.argv[1] == "tuned":
    from segray.runtime import keep_freed_memory
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
p = libc.malloc(64 << 20)
print(libc.mallinfo2().hblkhd - before >= 64 << 20)
libc.free(ctypes.c_void_p(p))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
@pytest.mark.parametrize("mode, mmapped", [("default", "True"), ("tuned", "False")])
def test_large_blocks_come_from_the_heap_once_tuned(mode, mmapped):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == mmapped

