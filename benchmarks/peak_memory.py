"""Peak resident memory of a benchmark's own process (Linux ``/proc``), shared by the memory benchmarks.

Run each contender in its own subprocess with ``CHILD_ENV``: glibc then mmaps tensors of 64 KiB and
more and gives them back to the kernel when they are freed, so RSS follows the memory actually alive
(its default keeps freed heap memory resident, which hides most differences).
"""

from __future__ import annotations

from pathlib import Path

CHILD_ENV = {"HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
"""Environment for a measured child process (added to the parent's)."""


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only).")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False when the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
