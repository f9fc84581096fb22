"""tools/benchmark_throughput.py --stage-busy / --profile-comm on 2 gloo ranks, and the
trace arithmetic of tools/comm_trace.py."""

import importlib.util
import sys
from pathlib import Path

import pytest
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from tests.dist_utils import spawn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
spec = importlib.util.spec_from_file_location("benchmark_throughput", ROOT / "tools" / "benchmark_throughput.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

from comm_trace import comm_times  # noqa: E402  (tools/, on the path above)


def event(name, start, end, thread=1, stream=None):
    """A profiler event as torch.profiler builds them; with `stream`, a CUDA kernel on it."""
    on_gpu = stream is not None
    return FunctionEvent(id=0, name=name, thread=stream if on_gpu else thread, start_us=start, end_us=end,
                         device_type=DeviceType.CUDA if on_gpu else DeviceType.CPU, device_resource_id=stream)


def test_comm_times_split_waiting_from_hidden():
    """Main thread (1): a step of 0..100 us. Collectives on gloo's thread (2):
    10..30 while the main thread computes (hidden), 40..60 while it only waits (exposed),
    and 70..90 behind an FSDP2 reduce region on the main thread whose buffer copy
    (aten::copy_ 70..72) is communication, not compute. The region starts at 65, before
    the collective does: waiting from 65."""
    events = [
        event("benchmark::step", 0, 100),
        event("aten::mm", 5, 35), event("gloo:all_gather", 10, 30, thread=2),
        event("c10d::allreduce_", 38, 40), event("gloo:all_reduce", 40, 60, thread=2),
        event("FSDP::post_backward_reduce (llm.layers.0)", 65, 92), event("aten::copy_", 70, 72),
        event("gloo:all_reduce", 70, 90, thread=2),
        event("gloo:all_reduce", 120, 130, thread=2),  # after the step: not counted
    ]
    times = comm_times(events)
    assert times["collectives"] == 3
    assert times["collective_s"] == pytest.approx(60e-6)  # 20 + 20 + 20 in flight
    assert times["hidden_s"] == pytest.approx(20e-6)
    assert times["waiting_s"] == pytest.approx((2 + 20 + 27) * 1e-6)  # c10d call, idle wait, FSDP region


def test_comm_times_reads_nccl_kernels_on_gpu():
    """A GPU trace: the step's CPU region 0..100 us; kernels on the compute stream (7) and
    NCCL's (13). The all-gather 10..30 runs beside the matmul 5..25: 15 hidden, 5 exposed;
    the reduce-scatter 40..60 beside a memcpy 50..55 only: 5 hidden, 15 exposed; a second
    reduce-scatter 45..50 overlaps the first (in flight once). gloo-style CPU events and
    the CPU side of the step are not read when kernels are there, and a kernel after the
    step is not counted."""
    events = [
        event("benchmark::step", 0, 100), event("aten::mm", 1, 3), event("nccl:all_gather", 9, 31),
        event("ampere_sgemm_128x64_tn", 5, 25, stream=7),
        event("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 10, 30, stream=13),
        event("ncclKernel_ReduceScatter_RING_LL_Sum_float(ncclWorkElem)", 40, 60, stream=13),
        event("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 45, 50, stream=14),
        event("Memcpy DtoD (Device -> Device)", 50, 55, stream=7),
        event("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 120, 130, stream=13),
    ]
    times = comm_times(events)
    assert times["collectives"] == 3
    assert times["collective_s"] == pytest.approx(40e-6)
    assert times["hidden_s"] == pytest.approx(20e-6)
    assert times["waiting_s"] == pytest.approx(20e-6)


COMMON = ["--preset", "tiny", "--device", "cpu", "--seq-length", "96", "--warmup-iters", "1", "--timed-iters", "2"]


def _stage_busy(rank, world):
    row = bench.main(COMMON + ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "2",
                               "--global-batch-size", "8", "--images-per-sample", "2", "--stage-busy"])
    even, auto = row["variants"]
    assert (even["variant"], auto["variant"]) == ("even", "auto (FLOPs)")
    assert (even["stage_layers"], auto["stage_layers"]) == ([2, 2], [1, 3])
    for variant in row["variants"]:
        for r in variant["per_rank_ms"]:  # busy: the stage's compute, a part of the step
            assert 0 < r["busy_ms"] < r["step_ms"] and 0 < r["busy_cpu_ms"] <= r["busy_ms"] * 1.05, variant


def _profile_comm(rank, world):
    row = bench.main(COMMON + ["--micro-batch-size", "2", "--global-batch-size", "4",
                               "--data-parallel-sharding", "fsdp", "--profile-comm"])
    overlap, single = row["variants"]
    assert overlap["variant"].startswith("overlap") and single["variant"].startswith("no overlap")
    mine = lambda v: v["per_rank_ms"][rank]  # noqa: E731
    # Per block: an all-gather and a reduce-scatter for every block; one unit: a handful.
    assert mine(overlap)["collectives"] > 2 * mine(single)["collectives"] > 0
    for v in (overlap, single):
        r = mine(v)
        assert 0 < r["collective_ms"] and 0 <= r["hidden_ms"] <= r["collective_ms"]
        assert r["waiting_ms"] <= r["profiled_step_ms"]


def test_stage_busy_two_ranks():
    spawn(2, _stage_busy)


def test_profile_comm_two_ranks():
    spawn(2, _profile_comm)


def test_modes_refuse_one_process():
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size > 1"):
        bench.main(COMMON + ["--stage-busy"])
