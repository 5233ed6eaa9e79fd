"""Communication of a training step: how much of it the GPU waits for, how many bytes it moves, and what
that means for more GPUs (an estimate, on paper).

exposed_communication(events)   from a torch.profiler Chrome trace: per GPU, the time an NCCL kernel runs
                                (union over streams: `comm_ms`) and the part of it during which no other
                                GPU activity (kernel, copy, memset) runs (`exposed_ms`): communication
                                the step waits for, instead of hiding it behind compute. An NCCL kernel
                                also runs while it waits for a slower rank, so skew between ranks counts
                                as exposed communication too, as it costs the step the same.
step_volume(banks, replicated, world)
                                bytes each rank sends per train.py step with ring collectives: Muon's
                                reduce-scatter of the bf16 bank gradients and all-gather of the bf16
                                updates (banks padded to a multiple of the world size, SPEC 5.3), and the
                                all-reduce of the replicated gradients (embedding, scalars)
estimate_scaling(...)           the step time and scaling at another world size from measured ones
"""

from __future__ import annotations

from collections import defaultdict

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
# NVLink 4 (H100 / H200 SXM): 18 links x 25 GB/s = 450 GB/s per direction per GPU; NCCL's ring
# collectives reach ~80% of it on large messages (its bus bandwidth). Assumed, not measured here.
NVLINK_GBPS = 450.0
NCCL_EFFICIENCY = 0.8


def is_communication(name: str) -> bool:
    return "nccl" in name.lower()


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sorted lists of disjoint intervals."""
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, hi - lo)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def _device(e: dict):
    return e.get("args", {}).get("device", e.get("pid"))


def exposed_communication(events: list[dict]) -> dict:
    """{device: {span_ms, comm_ms, exposed_ms, hidden_ms, exposed_pct, comm_kernels}} over the GPU activity
    of a Chrome trace (times in the trace are microseconds). exposed_pct is exposed_ms as % of the span
    (first to last GPU activity of that device). Raises ValueError when there is no GPU activity."""
    comm: dict = defaultdict(list)
    other: dict = defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in GPU_CATS or not e.get("dur"):
            continue
        interval = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        (comm if is_communication(e.get("name", "")) else other)[_device(e)].append(interval)
    devices = sorted(set(comm) | set(other), key=str)
    if not devices:
        raise ValueError("the trace holds no GPU activity (was CUDA profiled?)")
    out = {}
    for dev in devices:
        c, o = _union(comm[dev]), _union(other[dev])
        spans = [*c, *o]
        span = max(b for _, b in spans) - min(a for a, _ in spans)
        comm_us = _length(c)
        exposed_us = comm_us - _overlap(c, o)
        out[dev] = {
            "span_ms": span / 1e3,
            "comm_ms": comm_us / 1e3,
            "exposed_ms": exposed_us / 1e3,
            "hidden_ms": (comm_us - exposed_us) / 1e3,
            "exposed_pct": 100.0 * exposed_us / span if span > 0 else 0.0,
            "comm_kernels": len(comm[dev]),
        }
    return out


def step_volume(banks: list[tuple[int, int, int]], replicated: list[tuple[int, int]], world: int) -> dict:
    """Bytes one rank sends per step. banks: (matrices, rows, cols) of each Muon bank (sent as bf16);
    replicated: (numel, bytes per element) of each gradient averaged by all-reduce."""
    if world <= 1:
        return {"reduce_scatter": 0.0, "all_gather": 0.0, "all_reduce": 0.0, "total": 0.0}
    share = (world - 1) / world  # a ring moves (W - 1) / W of the buffer through each rank's link
    padded = sum(-(-b // world) * world * r * c for b, r, c in banks)
    bank_bytes = 2.0 * padded
    replicated_bytes = float(sum(n * size for n, size in replicated))
    out = {
        "reduce_scatter": share * bank_bytes,
        "all_gather": share * bank_bytes,
        "all_reduce": 2 * share * replicated_bytes,  # reduce-scatter + all-gather
    }
    out["total"] = sum(out.values())
    return out


def estimate_scaling(
    t1_ms: float,
    tn_ms: float,
    n: int,
    exposed_n_ms: float,
    volume_n: float,
    target: int,
    volume_target: float,
    link_gbps: float = NVLINK_GBPS * NCCL_EFFICIENCY,
) -> dict:
    """Step time and scaling at `target` GPUs from a measured step at 1 GPU (t1) and at n GPUs (tn, with
    exposed_n of exposed communication). Model: t_N = t1 / N + overhead + exposed_N, where overhead is
    the per-rank work that does not shrink with N (AdamW on the replicated parameters, the EMA, the
    clip and the guard, Muon's update of the whole banks, the padding of the NS shards) measured at n,
    and the exposed communication grows with the bytes each rank sends (same overlap). Beside it, the
    bandwidth view: communication costs the wire time of the target's bytes at `link_gbps`, none of it
    hidden (the measured exposure also holds waits for slower ranks, which bytes do not predict)."""
    overhead = tn_ms - t1_ms / n - exposed_n_ms
    exposed = exposed_n_ms * volume_target / volume_n if volume_n > 0 else 0.0
    wire_ms = volume_target / (link_gbps * 1e9) * 1e3
    step = t1_ms / target + overhead + exposed
    step_wire = t1_ms / target + overhead + wire_ms
    return {
        "gpus": target,
        "step_ms": step,
        "scaling": t1_ms / (target * step),
        "overhead_ms": overhead,
        "exposed_comm_ms": exposed,
        "wire_ms": wire_ms,
        "link_gbps": link_gbps,
        "step_ms_wire": step_wire,
        "scaling_wire": t1_ms / (target * step_wire),
    }
