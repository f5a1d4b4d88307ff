"""`usable_cpus`: the CPUs this process may use (affinity, cgroup quota), not the machine's.

The cgroup files are fabricated under `tmp_path` (the functions take the cgroup root and the
`/proc/self/cgroup` file as arguments); `os.sched_getaffinity` / `os.process_cpu_count` are
monkeypatched.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from robust_meta import _cpus
from robust_meta._cpus import affinity_cpus, cgroup_cpu_limit, usable_cpus


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def cpus(monkeypatch):
    """Pretend the process may run on `n` CPUs of a 128-core machine (no process_cpu_count)."""

    def set_cpus(n: int) -> None:
        monkeypatch.setattr(os, "cpu_count", lambda: 128)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
        monkeypatch.delattr(os, "process_cpu_count", raising=False)

    return set_cpus


@pytest.fixture
def no_proc(tmp_path) -> Path:
    return tmp_path / "no-proc-self-cgroup"


# --------------------------------------------------------------------------- affinity


def test_affinity_counts_the_allowed_cpus_not_the_machine(cpus, tmp_path, no_proc):
    cpus(4)  # taskset -c 0-3 on a 128-core node
    assert affinity_cpus() == 4
    assert usable_cpus(cgroup_root=tmp_path / "none", proc_cgroup=no_proc) == 4


def test_without_sched_getaffinity_the_cpu_count(monkeypatch, tmp_path, no_proc):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert affinity_cpus() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "cannot be determined"
    assert affinity_cpus() == 1 and usable_cpus(cgroup_root=tmp_path, proc_cgroup=no_proc) == 1


def test_process_cpu_count_is_honoured_where_it_exists(cpus, monkeypatch, tmp_path, no_proc):
    cpus(8)
    monkeypatch.setattr(os, "process_cpu_count", lambda: 3, raising=False)  # Python 3.13, PYTHON_CPU_COUNT=3
    assert affinity_cpus() == 3
    assert usable_cpus(cgroup_root=tmp_path, proc_cgroup=no_proc) == 3
    monkeypatch.setattr(os, "process_cpu_count", lambda: None, raising=False)
    assert affinity_cpus() == 8


def test_a_failing_sched_getaffinity_falls_back(monkeypatch):
    def broken(pid):
        raise OSError("not supported")

    monkeypatch.setattr(os, "sched_getaffinity", broken, raising=False)
    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert affinity_cpus() == 5


# --------------------------------------------------------------------------- cgroup v2


@pytest.mark.parametrize(("cpu_max", "limit", "usable"), [
    ("max 100000\n", None, 16),
    ("400000 100000\n", 4.0, 4),
    ("150000 100000\n", 1.5, 2),  # rounded up: 1.5 CPUs of time can keep 2 workers busy
    ("50000 100000\n", 0.5, 1),  # at least 1
    ("max\n", None, 16),  # period omitted: the default
    ("3200000 100000\n", 32.0, 16),  # a quota above the affinity does not add CPUs
])
def test_cgroup_v2_cpu_max_at_the_root(cpus, tmp_path, no_proc, cpu_max, limit, usable):
    cpus(16)
    write(tmp_path / "cpu.max", cpu_max)
    assert cgroup_cpu_limit(tmp_path, no_proc) == limit
    assert usable_cpus(cgroup_root=tmp_path, proc_cgroup=no_proc) == usable


def test_cgroup_v2_own_path_and_its_ancestors(cpus, tmp_path):
    cpus(128)
    proc = write(tmp_path / "proc-cgroup", "0::/kubepods.slice/pod1/container2\n")
    root = tmp_path / "cg"
    write(root / "cpu.max", "max 100000\n")
    write(root / "kubepods.slice" / "cpu.max", "6400000 100000\n")  # 64 for all pods
    write(root / "kubepods.slice" / "pod1" / "cpu.max", "800000 100000\n")  # 8 for the pod
    write(root / "kubepods.slice" / "pod1" / "container2" / "cpu.max", "max 100000\n")
    write(root / "kubepods.slice" / "pod9" / "cpu.max", "100000 100000\n")  # another pod: ignored
    assert cgroup_cpu_limit(root, proc) == 8.0
    assert usable_cpus(cgroup_root=root, proc_cgroup=proc) == 8
    # the container's own limit, tighter than its pod's
    write(root / "kubepods.slice" / "pod1" / "container2" / "cpu.max", "250000 100000\n")
    assert usable_cpus(cgroup_root=root, proc_cgroup=proc) == 3


def test_cgroup_v2_path_not_mounted_here_uses_the_root_files(cpus, tmp_path):
    # a container with its own cgroup namespace: /sys/fs/cgroup is the container's cgroup
    cpus(128)
    proc = write(tmp_path / "proc-cgroup", "0::/system.slice/docker-abc.scope\n")
    root = tmp_path / "cg"
    write(root / "cpu.max", "200000 100000\n")  # docker --cpus 2
    assert usable_cpus(cgroup_root=root, proc_cgroup=proc) == 2


def test_a_path_leaving_the_root_is_not_followed(cpus, tmp_path):
    cpus(128)
    root = tmp_path / "cg"
    write(tmp_path / "cpu.max", "100000 100000\n")  # outside root: must not be read
    write(root / "cpu.max", "300000 100000\n")
    proc = write(tmp_path / "proc-cgroup", "0::/../..\n")
    assert usable_cpus(cgroup_root=root, proc_cgroup=proc) == 3


# --------------------------------------------------------------------------- cgroup v1


@pytest.mark.parametrize(("quota", "period", "usable"), [
    ("-1", "100000", 16),  # no quota
    ("400000", "100000", 4),
    ("250000", "100000", 3),
    ("10000", "100000", 1),
    ("400000", "0", 16),  # invalid period: ignored
])
def test_cgroup_v1_cfs_quota(cpus, tmp_path, no_proc, quota, period, usable):
    cpus(16)
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", quota + "\n")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", period + "\n")
    assert usable_cpus(cgroup_root=tmp_path, proc_cgroup=no_proc) == usable


def test_cgroup_v1_own_path_under_a_joint_mount(cpus, tmp_path):
    cpus(128)
    proc = write(tmp_path / "proc-cgroup", (
        "12:memory:/slurm/uid_1000/job_7\n"
        "4:cpu,cpuacct:/slurm/uid_1000/job_7/step_0\n"
        "1:name=systemd:/user.slice\n"
        "0::/\n"
    ))
    mount = tmp_path / "cg" / "cpu,cpuacct"
    write(mount / "cpu.cfs_quota_us", "-1\n")
    write(mount / "cpu.cfs_period_us", "100000\n")
    job = mount / "slurm" / "uid_1000" / "job_7"
    write(job / "cpu.cfs_quota_us", "400000\n")
    write(job / "cpu.cfs_period_us", "100000\n")
    write(job / "step_0" / "cpu.cfs_quota_us", "-1\n")
    write(job / "step_0" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path / "cg", proc) == 4.0
    assert usable_cpus(cgroup_root=tmp_path / "cg", proc_cgroup=proc) == 4


def test_affinity_and_quota_the_smaller_wins(cpus, tmp_path, no_proc):
    write(tmp_path / "cpu.max", "800000 100000\n")
    cpus(2)
    assert usable_cpus(cgroup_root=tmp_path, proc_cgroup=no_proc) == 2
    cpus(64)
    assert usable_cpus(cgroup_root=tmp_path, proc_cgroup=no_proc) == 8


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("text", ["", "garbage\n", "1.5 100000\n", "-5 100000\n", "100000 -1\n", "a b c\n"])
def test_malformed_cgroup_files_mean_no_limit(cpus, tmp_path, no_proc, text):
    cpus(16)
    write(tmp_path / "cpu.max", text)
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", text)
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path, no_proc) is None
    assert usable_cpus(cgroup_root=tmp_path, proc_cgroup=no_proc) == 16


def test_no_cgroup_files_at_all(cpus, tmp_path, no_proc):
    cpus(12)
    assert cgroup_cpu_limit(tmp_path / "absent", no_proc) is None
    assert usable_cpus(cgroup_root=tmp_path / "absent", proc_cgroup=no_proc) == 12


def test_on_this_machine_within_the_affinity():
    n = usable_cpus()
    assert isinstance(n, int) and 1 <= n <= affinity_cpus() <= (os.cpu_count() or 1)
    assert _cpus.__all__ == ["affinity_cpus", "cgroup_cpu_limit", "usable_cpus"]
