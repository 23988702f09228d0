"""Outputs too large for the host's memory are refused before any work, with a MemoryError.

The seed's attention probabilities and similarities grow as L**2: one (L, D) pair of L = 20000 with 4
heads asks for 32 GB in float64 by default (``need_weights`` and ``need_similarity`` are on for
unbatched calls). Linux lets such an allocation through and then kills the process as its pages are
touched, with no Python error at all. Only a certain failure is refused: the outputs alone, against
the memory available now (``MemAvailable`` and free swap, and a cgroup's limit where one applies).
"""

from __future__ import annotations

#: Outputs below this many bytes are not checked: reading the memory figures takes ~60 us on this
#: project's CPU, as long as a whole small call.
CHECKED_FROM_BYTES = 1 << 28

_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


#: (limit, usage) files of this process's cgroup as a container sees it: v2, then v1's memory controller.
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit, if it has one."""
    for limit_file, usage_file in CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes ~2**63 for none
            return max(0, limit - usage)
    return None


#: The kernel's memory figures (Linux).
MEMINFO = "/proc/meminfo"


def available_bytes() -> int | None:
    """Memory this process can still take: ``MemAvailable`` plus free swap from /proc/meminfo, and no
    more than the room under a cgroup limit. None where there is no /proc/meminfo (not Linux)."""
    try:
        with open(MEMINFO) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        kib = int(fields["MemAvailable"].split()[0]) + int(fields.get("SwapFree", "0 kB").split()[0])
    except (OSError, KeyError, ValueError):
        return None
    room = _cgroup_room()
    return kib * 1024 if room is None else min(kib * 1024, room)


def check_outputs_fit(elements: dict[str, int], dtype: str, remedy: str, what: str = "the outputs asked for") -> None:
    """MemoryError when ``what`` (the outputs by default), ``elements`` (a description -> element
    count, 0 or False for one not asked for) of ``dtype``, need more than the memory available;
    ``remedy`` says how to ask for less."""
    itemsize = _ITEMSIZE[dtype]
    total = sum(elements.values()) * itemsize
    if total < CHECKED_FROM_BYTES:
        return
    available = available_bytes()
    if available is None or total <= available:
        return
    parts = ", ".join(f"{part} {_gib(count * itemsize)}"
                      for part, count in elements.items() if 100 * count * itemsize >= total)
    raise MemoryError(
        f"{what} need {_gib(total)} of {dtype} ({parts}), more than the {_gib(available)} of memory "
        f"available; {remedy}"
    )


def _gib(size: int) -> str:
    # Past 2**70 bytes no machine has the memory, and a size from a typo's 10**200 would overflow a float.
    return f"{size / 2**30:.2f} GiB" if size < 1 << 70 else "over 2**70 bytes"
