"""How many CPUs this process may use: its CPU affinity and its cgroup CPU quota.

`os.cpu_count()` counts the machine's CPUs. A job often may use fewer: ``taskset`` or a Slurm
allocation restrict its CPU affinity, and a cgroup CPU quota (Kubernetes ``limits.cpu``,
``docker --cpus``, systemd ``CPUQuota=``) limits its CPU time. Starting one worker per CPU of
a 128-core node where 4 are allocated starts 128 processes that share 4 CPUs.
`usable_cpus` is the number to size worker pools with (``--workers auto``).

Example:
    >>> from robust_meta._cpus import usable_cpus
    >>> workers = usable_cpus()     # e.g. 4 under `taskset -c 0-3` or `docker --cpus 4`
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath

__all__ = ["affinity_cpus", "cgroup_cpu_limit", "usable_cpus"]

#: Where the cgroup file systems are mounted (v2: unified; v1: one folder per controller).
CGROUP_ROOT = "/sys/fs/cgroup"
#: The cgroups of this process, one ``hierarchy-ID:controllers:path`` line per hierarchy.
PROC_SELF_CGROUP = "/proc/self/cgroup"

# cgroup v1 mounts the cpu controller on its own or jointly with cpuacct
_V1_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def affinity_cpus() -> int:
    """The CPUs the scheduler lets this process run on (at least 1).

    ``os.process_cpu_count()`` where it exists (Python 3.13; it also honours the
    ``PYTHON_CPU_COUNT`` override), else ``len(os.sched_getaffinity(0))`` (Linux), else
    ``os.cpu_count()``.
    """
    process_cpu_count = getattr(os, "process_cpu_count", None)
    if process_cpu_count is not None:
        n = process_cpu_count()
        if n:
            return max(1, int(n))
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            n = len(getaffinity(0))
        except OSError:
            n = 0
        if n:
            return n
    return max(1, os.cpu_count() or 1)


def cgroup_cpu_limit(
    root: str | os.PathLike = CGROUP_ROOT,
    proc_cgroup: str | os.PathLike = PROC_SELF_CGROUP,
) -> float | None:
    """The CPU quota of this process's cgroups, in CPUs (may be fractional), or `None`.

    cgroup v2 reads ``cpu.max`` (``"max 100000"``: no limit; ``"400000 100000"``: 4 CPUs);
    cgroup v1 reads ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota ``-1``: no limit)
    under ``<root>/cpu`` (or ``cpu,cpuacct``). The process's own cgroup comes from
    `proc_cgroup`; its folder and every ancestor up to `root` are read and the tightest limit
    wins, since a parent's quota bounds its children. Where that folder is not under `root`
    (a container with its own cgroup namespace sees its cgroup as the root), or `proc_cgroup`
    cannot be read, only the files at the root are read. Missing, unreadable or malformed
    files count as no limit.

    Args:
        root: where the cgroup file systems are mounted (a fabricated folder in tests).
        proc_cgroup: the ``/proc/self/cgroup`` file to resolve the process's cgroup with.

    Returns:
        ``quota / period`` of the tightest limit found, or `None` when there is none.
    """
    root = Path(root)
    v2_path, v1_paths = _own_cgroups(Path(proc_cgroup))
    limits = [_cpu_max(d) for d in _up_to_root(root, v2_path)]
    for controllers, rel in (v1_paths.items() if v1_paths else [(None, None)]):
        mount = _v1_mount(root, controllers)
        if mount is not None:
            limits.extend(_cfs_quota(d) for d in _up_to_root(mount, rel))
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def usable_cpus(
    *,
    cgroup_root: str | os.PathLike = CGROUP_ROOT,
    proc_cgroup: str | os.PathLike = PROC_SELF_CGROUP,
) -> int:
    """The number of CPUs this process may use: the size for a pool of CPU-bound workers.

    ``min(affinity_cpus(), ceil(cgroup_cpu_limit()))``, at least 1. A fractional quota is
    rounded up (1.5 CPUs of time can keep 2 workers busy); a quota above the affinity adds
    nothing. Reads a few small files on each call (affinity and quotas can change at run
    time), so callers that need it often should keep the result.

    Args:
        cgroup_root: where the cgroup file systems are mounted (for tests).
        proc_cgroup: the ``/proc/self/cgroup`` file (for tests).

    Returns:
        A positive int.

    Example:
        >>> usable_cpus()   # 4 on a 128-core node under `taskset -c 0-3`
        4
    """
    n = affinity_cpus()
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        n = min(n, math.ceil(limit))
    return max(1, n)


# --------------------------------------------------------------------------- reading the files


def _own_cgroups(proc_cgroup: Path) -> tuple[str | None, dict[str, str]]:
    """This process's cgroup v2 path, and its cgroup v1 paths by mount name of the cpu controller."""
    try:
        text = proc_cgroup.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, {}
    v2, v1 = None, {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1[controllers] = path
    return v2, v1


def _up_to_root(base: Path, rel: str | None) -> list[Path]:
    """``base/rel`` and its parents up to ``base``; just ``[base]`` when ``rel`` is not simply under it."""
    if rel:
        parts = PurePosixPath(rel).parts
        parts = parts[1:] if parts and parts[0] == "/" else parts
        if parts and ".." not in parts and "." not in parts:
            leaf = base.joinpath(*parts)
            if leaf.is_dir():
                return [leaf, *(leaf.parents[i] for i in range(len(parts)))]  # ..., base
    return [base]


def _v1_mount(root: Path, controllers: str | None) -> Path | None:
    """The folder where cgroup v1 mounted the cpu controller (``cpu`` or ``cpu,cpuacct``)."""
    names = ([controllers] if controllers else []) + list(_V1_MOUNTS)
    return next((root / n for n in names if (root / n).is_dir()), None)


def _read_fields(path: Path, count: int) -> list[str] | None:
    """The 1 to ``count`` whitespace-separated fields of a small file, or `None`."""
    try:
        fields = path.read_text(encoding="ascii", errors="replace").split()
    except OSError:
        return None
    return fields if 1 <= len(fields) <= count else None


def _cpu_max(folder: Path) -> float | None:
    """cgroup v2 ``cpu.max``: ``"$MAX $PERIOD"``, ``$MAX`` being ``max`` for no limit."""
    fields = _read_fields(folder / "cpu.max", 2)
    if fields is None or fields[0] == "max":
        return None
    period = fields[1] if len(fields) == 2 else "100000"
    return _ratio(fields[0], period)


def _cfs_quota(folder: Path) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; a quota of -1 is no limit."""
    quota = _read_fields(folder / "cpu.cfs_quota_us", 1)
    period = _read_fields(folder / "cpu.cfs_period_us", 1)
    if quota is None or period is None:
        return None
    return _ratio(quota[0], period[0])


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:  # -1: unlimited; 0 or negative: not a valid setting
        return None
    return q / p
