"""The memory a cache may use under a cgroup limit below the root: a SLURM step, a systemd slice, a cgroup v1 host.

``available_memory`` read only ``/sys/fs/cgroup/memory.max``, the root a container sees. A SLURM job (without its own
cgroup namespace) has its limit in its own cgroup (``/proc/self/cgroup`` names it), and a cgroup v1 host keeps it in
``/sys/fs/cgroup/memory/<path>/memory.limit_in_bytes``: the check counted the whole machine's memory, and a cache that
did not fit the job was loaded until the job was killed. Usage also counted the inactive file cache (a dataset just
read), which the kernel reclaims first.
"""

from __future__ import annotations

from pathlib import Path

import dira3d.engines.cache as cache_module
from dira3d.engines.cache import available_memory

MEMINFO = "MemTotal:       64000000 kB\nMemAvailable:   50000000 kB\n"  # 51.2 GB available on the node
STEP = "/system.slice/slurmstepd.scope/job_7/step_0"


def _fake(monkeypatch, tmp_path: Path, files: dict[str, str]) -> None:
    """Every file available_memory reads, from ``files``; any other path does not exist."""
    real = {}
    for name, text in files.items():
        real[name] = tmp_path / name.strip("/").replace("/", "_")
        real[name].write_text(text)
    monkeypatch.setattr(cache_module, "Path", lambda p: real.get(str(p), tmp_path / "absent"))


def test_a_slurm_step_limit_in_its_own_cgroup_v2_is_seen(tmp_path, monkeypatch):
    _fake(monkeypatch, tmp_path, {
        "/proc/meminfo": MEMINFO, "/proc/self/cgroup": f"0::{STEP}\n",
        "/sys/fs/cgroup/memory.max": "max\n", "/sys/fs/cgroup/memory.current": "9000000000\n",
        "/sys/fs/cgroup/system.slice/slurmstepd.scope/job_7/memory.max": "16000000000\n",
        "/sys/fs/cgroup/system.slice/slurmstepd.scope/job_7/memory.current": "4000000000\n",
        f"/sys/fs/cgroup{STEP}/memory.max": "max\n", f"/sys/fs/cgroup{STEP}/memory.current": "3000000000\n"})
    assert available_memory() == 12_000_000_000  # the job's limit, two levels up; not the node's 51.2 GB


def test_the_tightest_level_wins(tmp_path, monkeypatch):
    _fake(monkeypatch, tmp_path, {
        "/proc/meminfo": MEMINFO, "/proc/self/cgroup": "0::/a/b\n",
        "/sys/fs/cgroup/a/memory.max": "10000000000\n", "/sys/fs/cgroup/a/memory.current": "2000000000\n",
        "/sys/fs/cgroup/a/b/memory.max": "5000000000\n", "/sys/fs/cgroup/a/b/memory.current": "1000000000\n"})
    assert available_memory() == 4_000_000_000


def test_a_cgroup_v1_limit_is_seen_and_its_no_limit_is_not_a_limit(tmp_path, monkeypatch):
    files = {"/proc/meminfo": MEMINFO,
             "/proc/self/cgroup": "9:pids:/job_7\n4:memory:/slurm/uid_0/job_7\n1:cpu,cpuacct:/job_7\n0::/\n",
             "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
             "/sys/fs/cgroup/memory/memory.usage_in_bytes": "60000000000\n",
             "/sys/fs/cgroup/memory/slurm/uid_0/job_7/memory.limit_in_bytes": "8000000000\n",
             "/sys/fs/cgroup/memory/slurm/uid_0/job_7/memory.usage_in_bytes": "6000000000\n"}
    _fake(monkeypatch, tmp_path, files)
    assert available_memory() == 2_000_000_000
    files["/sys/fs/cgroup/memory/slurm/uid_0/job_7/memory.limit_in_bytes"] = "9223372036854771712\n"
    _fake(monkeypatch, tmp_path, files)
    assert available_memory() == 51_200_000_000  # no limit anywhere: MemAvailable


def test_inactive_file_cache_counts_as_room(tmp_path, monkeypatch):
    """A job that has just read 5 GB of volumes has them as inactive file cache in its usage: reclaimable."""
    _fake(monkeypatch, tmp_path, {
        "/proc/meminfo": MEMINFO, "/proc/self/cgroup": "0::/job\n",
        "/sys/fs/cgroup/job/memory.max": "8000000000\n", "/sys/fs/cgroup/job/memory.current": "7000000000\n",
        "/sys/fs/cgroup/job/memory.stat": "anon 1500000000\nfile 5500000000\nactive_file 500000000\n"
                                          "inactive_file 5000000000\n"})
    assert available_memory() == 6_000_000_000  # 8 - (7 - 5) GB
    _fake(monkeypatch, tmp_path, {  # cgroup v1: the hierarchy's total, as its usage is
        "/proc/meminfo": MEMINFO, "/proc/self/cgroup": "4:memory:/job\n",
        "/sys/fs/cgroup/memory/job/memory.limit_in_bytes": "8000000000\n",
        "/sys/fs/cgroup/memory/job/memory.usage_in_bytes": "7000000000\n",
        "/sys/fs/cgroup/memory/job/memory.stat": "inactive_file 1000000000\ntotal_inactive_file 3000000000\n"})
    assert available_memory() == 4_000_000_000


def test_without_proc_self_cgroup_the_root_v2_limit_is_read(tmp_path, monkeypatch):
    _fake(monkeypatch, tmp_path, {"/proc/meminfo": MEMINFO, "/sys/fs/cgroup/memory.max": "3000000000\n",
                                  "/sys/fs/cgroup/memory.current": "1000000000\n"})
    assert available_memory() == 2_000_000_000
