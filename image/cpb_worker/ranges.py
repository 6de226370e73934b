"""Which image sets a job runs, and how they are cut into per-process ranges."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

from .errors import BadInput

Range = Tuple[int, int]  # 1-based, inclusive, as CellProfiler's -f/-l


def split_range(first: int, last: int, parts: int) -> List[Range]:
    """Cut first..last into `parts` contiguous ranges whose sizes differ by at most one.

    Contiguous ranges keep ImageNumber order and let each CellProfiler
    process start once; equal sizes make the processes finish together."""
    total = last - first + 1
    parts = max(1, min(parts, total))
    size, extra = divmod(total, parts)
    out, start = [], first
    for index in range(parts):
        stop = start + size + (1 if index < extra else 0) - 1
        out.append((start, stop))
        start = stop + 1
    return out


def array_child_range(index: int, per_job: int, total: int) -> Range:
    """The range of array child `index`: [i*n+1, min((i+1)*n, total)] (CONTRACTS.md)."""
    if per_job < 1:
        raise BadInput(f"CPB_IMAGE_SET_COUNT/CPB_IMAGE_SETS_PER_JOB: image_sets_per_job must be >= 1, got {per_job}")
    children = (total + per_job - 1) // per_job
    if index < 0 or index >= children:
        raise BadInput(f"AWS_BATCH_JOB_ARRAY_INDEX {index} is out of range: {total} image sets in "
                       f"chunks of {per_job} make {children} children (indexes 0..{children - 1})")
    return index * per_job + 1, min((index + 1) * per_job, total)


def available_cpus(env: Mapping[str, str]) -> int:
    """vCPUs this job may use: CPB_VCPUS (what Batch granted), else the
    cgroup CPU quota, else the CPUs this process may run on."""
    value = env.get("CPB_VCPUS", "").strip()
    if value:
        try:
            number = int(float(value))
        except ValueError:
            raise BadInput(f"CPB_VCPUS must be a whole number of vCPUs, got {value!r}") from None
        if number < 1:
            raise BadInput(f"CPB_VCPUS must be at least 1, got {value!r}")
        return number
    quota = _cgroup_quota()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
    return max(1, min(affinity, quota) if quota else affinity)


def _cgroup_quota() -> Optional[int]:
    """CPUs allowed by cgroup v2 `cpu.max` (containers see the host's CPU count otherwise)."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, int(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


#: Memory one CellProfiler process may take, when CPB_PROCESS_MEMORY_MIB is not set. Measured with
#: bench/bench_memory.py (peak RSS of one `cellprofiler -c -r` process, its JVM included) on
#: CellProfiler 4.2.8.1: demo nuclei.cppipe 289 MiB, ExampleHuman 484 MiB, metadata_illum.cppipe
#: at 1080x1080 499 MiB and at 2160x2160 1,176 MiB. 2048 MiB covers the largest with 1.7x to
#: spare; a 5-channel Cell Painting pipeline on 2160x2160 sites needs more (~2.5 GB): set
#: CPB_PROCESS_MEMORY_MIB (image/README.md).
DEFAULT_PROCESS_MEMORY_MIB = 2048


def process_count(env: Mapping[str, str], cpus: int) -> Tuple[int, Optional[str]]:
    """(CellProfiler processes to run, warning or None): min(cpus, CPB_MEMORY_MIB // per-process
    memory), per-process memory from CPB_PROCESS_MEMORY_MIB or DEFAULT_PROCESS_MEMORY_MIB.
    Without CPB_MEMORY_MIB (a laptop run) only the CPUs count."""
    per_process = _positive(env, "CPB_PROCESS_MEMORY_MIB") or DEFAULT_PROCESS_MEMORY_MIB
    memory = _positive(env, "CPB_MEMORY_MIB")
    if memory is None:
        return cpus, None
    fits = memory // per_process
    if fits >= cpus:
        return cpus, None
    count = max(1, fits)
    warning = (f"memory limits the split: {count} CellProfiler process(es) for {cpus} vCPUs, because "
               f"{memory} MiB holds {fits} of {per_process} MiB each (CPB_PROCESS_MEMORY_MIB); give the job "
               f"{cpus * per_process} MiB (job_memory) to use every vCPU")
    if fits < 1:
        warning = (f"memory limits the split: {memory} MiB is less than one CellProfiler process needs "
                   f"({per_process} MiB, CPB_PROCESS_MEMORY_MIB); running 1 process, which may run out of memory")
    return count, warning


def _positive(env: Mapping[str, str], name: str) -> Optional[int]:
    value = (env.get(name) or "").strip()
    if not value:
        return None
    try:
        number = int(float(value))
    except ValueError:
        raise BadInput(f"{name} must be a whole number of MiB, got {value!r}") from None
    if number < 1:
        raise BadInput(f"{name} must be at least 1 MiB, got {value!r}")
    return number
