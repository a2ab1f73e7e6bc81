"""DPDK's EAL: the arguments pylb passes and the one start per process."""
from __future__ import annotations

import os
import pathlib

import structlog

from pylb._ffi import check, ffi, lib
from pylb.errors import StateError

log = structlog.get_logger("pylb.eal")
_started: "Eal | None" = None


def hugepages_available() -> bool:
    """True when 2 MiB pages are free and hugetlbfs is mounted."""
    try:
        meminfo = pathlib.Path("/proc/meminfo").read_text()
        mounts = pathlib.Path("/proc/mounts").read_text()
    except OSError:
        return False
    free = 0
    for line in meminfo.splitlines():
        if line.startswith("HugePages_Free:"):
            free = int(line.split()[1])
    return free > 0 and any(f.split()[2] == "hugetlbfs" for f in mounts.splitlines() if f.strip())


def eal_args(*, core: int | None = None, hugepages: str = "auto", memory_mb: int = 512,
             pci: bool = False, extra: list[str] | None = None,
             file_prefix: str | None = None, secondary: bool = False) -> list[str]:
    """The EAL command line. --in-memory keeps no files in /dev/hugepages, so a
    crashed process leaves nothing behind; --no-huge where pages are missing.
    A balancer with several worker processes (pylb/lanes.py) needs shared
    hugepage files instead: file_prefix names them, and secondary=True
    attaches to the primary that made them (remove_hugepage_files cleans up)."""
    if file_prefix is not None:
        if hugepages == "off" or not hugepages_available():
            raise StateError("several worker processes share hugepage memory: reserve "
                             "hugepages (./scripts/setup.sh) or run one worker")
        args = ["pylb", "-l", str(core if core is not None else sorted(os.sched_getaffinity(0))[0]),
                "--no-telemetry", "--log-level=*:warning", "--log-level=pmd.net.ring:error",
                "--log-level=lib.eal:error", f"--file-prefix={file_prefix}",
                "--proc-type=secondary" if secondary else "--proc-type=primary"]
        if not pci:
            args += ["--no-pci"]
        return args + list(extra or [])
    use_huge = hugepages == "on" or (hugepages == "auto" and hugepages_available())
    if core is None:
        allowed = sorted(os.sched_getaffinity(0))
        core = allowed[0]
    args = ["pylb", "-l", str(core), "--no-telemetry", "--log-level=*:warning",
            "--log-level=pmd.net.ring:error", "--log-level=lib.eal:error"]
    if use_huge:
        args += ["--in-memory"]
    else:
        args += ["--no-huge", "-m", str(memory_mb)]
        if hugepages == "auto":
            log.warning("hugepages unavailable: DPDK runs with --no-huge (slower; reserve "
                        "hugepages with ./scripts/setup.sh)")
    if not pci:
        args += ["--no-pci"]
    return args + list(extra or [])


def _hugetlbfs_mounts() -> list[pathlib.Path]:
    try:
        lines = pathlib.Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    return [pathlib.Path(f.split()[1]) for f in lines if len(f.split()) > 2
            and f.split()[2] == "hugetlbfs"]


def remove_hugepage_files(file_prefix: str) -> int:
    """Removes what a multi-process EAL of file_prefix leaves once every
    process of it has ended: its hugepage files and its runtime directory.
    Returns the files removed."""
    removed = 0
    for mount in _hugetlbfs_mounts():
        for f in mount.glob(f"{file_prefix}map_*"):
            try:
                f.unlink()
                removed += 1
            except OSError:
                pass
    runtime = pathlib.Path("/var/run/dpdk") / file_prefix
    if runtime.is_dir():
        for f in runtime.iterdir():
            try:
                f.unlink()
            except OSError:
                pass
        try:
            runtime.rmdir()
        except OSError:
            pass
    return removed


class Eal:
    """The running EAL of this process. DPDK allows one start per process; close()
    releases its memory, after which no port can be opened in this process."""

    def __init__(self, args: list[str]):
        global _started
        if _started is not None:
            raise StateError("the EAL already runs in this process")
        self.args = list(args)
        prefixes = [a.split("=", 1)[1] for a in self.args if a.startswith("--file-prefix=")]
        self.file_prefix = prefixes[-1] if prefixes else None
        self.secondary = "--proc-type=secondary" in self.args
        # The CPUs this process may use before DPDK pins its main thread to
        # the data-plane core: where helpers it starts (drain hooks) run.
        self.cpus_before = frozenset(os.sched_getaffinity(0))
        keep = [ffi.new("char[]", a.encode()) for a in self.args]
        argv = ffi.new("char *[]", keep)
        check(lib.pylb_eal_init(len(keep), argv), "starting DPDK (EAL)")
        self.hugepages = bool(lib.pylb_eal_hugepages())
        self._closed = False
        _started = self

    @classmethod
    def current(cls) -> "Eal | None":
        return _started

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                check(lib.pylb_eal_cleanup(), "stopping DPDK (EAL)")
            finally:
                # The primary ends last (pylb/lanes.py stops the others first).
                if self.file_prefix is not None and not self.secondary:
                    remove_hugepage_files(self.file_prefix)

    def __enter__(self) -> "Eal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
