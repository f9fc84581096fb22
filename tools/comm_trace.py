"""Time in collectives from a torch.profiler trace of one training step (--profile-comm).

On GPU (NCCL), from the device side of the trace of one step on one rank, the way
Holistic Trace Analysis counts it:
- collective: time some NCCL kernel (`ncclDevKernel_*`, `ncclKernel_*`) runs on the GPU;
- hidden: time an NCCL kernel runs while a compute kernel (any other kernel, memcpy or
  memset, on another stream) runs too;
- waiting (exposed): collective - hidden, the part of the communication the step pays for
  (an NCCL kernel that waits for a late peer counts here, as it should).
On CPU (gloo), from the CPU trace:
- collective: time some collective is in flight (gloo runs each one on a worker thread,
  recorded as `gloo:<op>`);
- waiting (exposed): time the main thread does not compute while a collective is in
  flight or while it is inside a communication call (FSDP2's all-gather and
  reduce-scatter regions, c10d ops);
- hidden: time a collective is in flight while the main thread runs compute ops.
Compute = the main thread's aten ops outside communication calls.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

Interval = tuple[float, float]
STEP = "benchmark::step"
COMM_FRAMES = ("FSDP::all_gather", "FSDP::post_backward_reduce", "FSDP::post_backward_rs_wait", "c10d::")


def merge(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def length(intervals: list[Interval]) -> float:
    return sum(end - start for start, end in intervals)


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Both merged; their common time."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def inside(interval: Interval, merged: list[Interval]) -> bool:
    return any(start <= interval[0] and interval[1] <= end for start, end in merged)


def is_comm_frame(name: str) -> bool:
    return name.startswith(COMM_FRAMES) and not name.startswith("FSDP::all_gather_copy_out")


def span(event) -> Interval:
    return event.time_range.start, event.time_range.end


def comm_times(events) -> dict[str, float]:
    """{"collective_s", "waiting_s", "hidden_s", "collectives"} of the one STEP region in
    `events`: from its GPU kernels when the trace has any, else from its CPU threads."""
    (step,) = [e for e in events if e.name == STEP]
    window = [span(step)]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and intersect(window, [span(e)])]
    return gpu_comm_times(kernels, window) if kernels else cpu_comm_times(events, step, window)


def is_nccl_kernel(name: str) -> bool:
    return name.lower().startswith("nccl")


def gpu_comm_times(kernels, window: list[Interval]) -> dict[str, float]:
    """Device-side: NCCL kernels against every other kernel, memcpy and memset, all streams."""
    comm = [span(e) for e in kernels if is_nccl_kernel(e.name)]
    in_flight = intersect(merge(comm), window)
    compute = intersect(merge([span(e) for e in kernels if not is_nccl_kernel(e.name)]), window)
    hidden = length(intersect(in_flight, compute))
    return {"collective_s": length(in_flight) / 1e6, "waiting_s": (length(in_flight) - hidden) / 1e6,
            "hidden_s": hidden / 1e6, "collectives": len(comm)}


def cpu_comm_times(events, step, window: list[Interval]) -> dict[str, float]:
    """Host-side: gloo's worker threads against the main thread's ops."""
    main = [e for e in events if e.thread == step.thread]
    collectives = [span(e) for e in events if e.name.startswith("gloo:") and inside(span(e), window)]
    in_flight = merge(collectives)
    calls = merge([span(e) for e in main if is_comm_frame(e.name)])
    compute = merge([span(e) for e in main if e.name.startswith("aten::") and not inside(span(e), calls)])
    pending = merge(in_flight + calls)
    waiting = length(pending) - length(intersect(pending, compute))
    return {"collective_s": length(in_flight) / 1e6, "waiting_s": waiting / 1e6,
            "hidden_s": length(intersect(in_flight, compute)) / 1e6, "collectives": len(collectives)}


def profiled_step(step, device: torch.device):
    """One step under torch.profiler, every rank starting together (a barrier: a rank that
    starts late would show up as the other's waiting); (the profile, the step's seconds).
    Read it with comm_times(profile.events()) after the timed steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        with record_function(STEP):
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return prof, seconds

if __name__ == "__main__":  # a module of tools/benchmark_throughput.py, not a tool of its own
    from megatron_emu.cli import refuse_run_as_tool

    refuse_run_as_tool(__file__, "--profile-comm",
                       "python -m torch.distributed.run --nproc-per-node 2 tools/benchmark_throughput.py --data-parallel-sharding fsdp --profile-comm")
