"""The clock this core runs at, measured: a chain of dependent integer adds timed in this process.

`add rax, rdx` with each add reading the previous one's result cannot go faster than one add per
cycle on any x86-64 core (its latency is 1 cycle on Intel since the P6 and on every AMD Zen), so
`adds / fastest time` is the core's clock while the chain ran. The OS's "cpu MHz" is the base
clock on most cloud VMs, which boost past it; perf counters are rarely readable in a container.

Every error goes the safe way for a lower bound on latency: a slow run (a preempted thread, a
noisy neighbour) only lowers the clock, so the fastest of many calls is taken; a core that ran
the adds faster than one per cycle would raise it, making the physical limit faster still. Under
heavy AVX load Intel cores may clock below this scalar chain, which again leaves the limit fast.

The chain is 330 bytes of x86-64 machine code in an executable page, called through ctypes;
where that is impossible (another architecture, a kernel that forbids executable mappings) the
clock is unknown and the report says so.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import struct
import time
from functools import lru_cache
from pathlib import Path

ADDS_PER_ITERATION = 100
ITERATIONS = 20_000  # 2 M dependent adds: about 0.6 ms at 3.5 GHz, long against the call's ~1 µs


def _machine_code() -> bytes:
    """uint64 chain(uint64 iterations): rax = 0; rdx = 1; loop { add rax, rdx ×100 }; return rax."""
    prologue = bytes([0x48, 0x31, 0xC0,  # xor rax, rax
                      0xBA, 0x01, 0x00, 0x00, 0x00])  # mov edx, 1
    body = bytes([0x48, 0x01, 0xD0]) * ADDS_PER_ITERATION  # add rax, rdx: each waits for the one before
    count = bytes([0x48, 0xFF, 0xCF])  # dec rdi (runs beside the chain, on another ALU)
    back = -(len(body) + len(count) + 6)
    jump = bytes([0x0F, 0x85]) + struct.pack("<i", back)  # jnz to the first add
    return prologue + body + count + jump + bytes([0xC3])  # ret


@lru_cache(maxsize=1)
def _chain():
    """The callable chain, or None where it cannot run. Kept alive for the process (lru_cache):
    the page must outlive every call."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    code = _machine_code()
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, AttributeError, ValueError):  # W^X policies (SELinux execmem), no PROT_EXEC on this OS
        return None
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    function = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)(address)
    if function(3) != 3 * ADDS_PER_ITERATION:
        return None
    return page, function


def chain_call():
    """A zero-argument callable running `chain_adds()` dependent adds, or None where it cannot run."""
    chain = _chain()
    if chain is None:
        return None
    function = chain[1]
    return lambda: function(ITERATIONS)


def chain_adds() -> int:
    return ITERATIONS * ADDS_PER_ITERATION


def ghz_from_seconds(fastest_s: float) -> float:
    """The clock implied by the fastest chain call: one add per cycle."""
    return chain_adds() / fastest_s / 1e9


def measure_ghz(calls: int = 50) -> float | None:
    """The clock on its own (the analysis times the chain in the same rounds as the kernels)."""
    call = chain_call()
    if call is None:
        return None
    fastest = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        call()
        fastest = min(fastest, time.perf_counter() - start)
    return ghz_from_seconds(fastest)


def reported_ghz() -> float | None:
    """What the OS says (/proc/cpuinfo "cpu MHz"): recorded beside the measured clock, never used
    for a limit (a cloud VM reports its base clock while the core boosts)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000.0
    except (OSError, ValueError):
        pass
    return None
