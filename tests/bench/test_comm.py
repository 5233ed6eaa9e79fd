"""bench.comm on synthetic traces: exposed communication is NCCL time with no other GPU activity."""

import pytest

from bench.comm import estimate_scaling, exposed_communication, step_volume


def kernel(name: str, ts: float, dur: float, device: int = 0, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": device, "tid": 7, "ts": ts, "dur": dur,
            "args": {"device": device, "stream": 7}}  # fmt: skip


GEMM, NCCL = "sm90_xmma_gemm_bf16bf16_bf16f32", "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL"


@pytest.mark.parametrize(
    "nccl, exposed_us",
    [((10, 40), 0.0), ((80, 70), 50.0), ((100, 30), 30.0), ((-20, 30), 20.0)],
    ids=["hidden", "half hidden", "after compute", "before compute"],
)
def test_exposed_is_communication_outside_other_work(nccl, exposed_us):
    events = [kernel(GEMM, 0, 100), kernel(NCCL, *nccl)]
    r = exposed_communication(events)[0]
    assert r["comm_ms"] == pytest.approx(nccl[1] / 1e3)
    assert r["exposed_ms"] == pytest.approx(exposed_us / 1e3)
    assert r["hidden_ms"] == pytest.approx((nccl[1] - exposed_us) / 1e3)
    span = max(100, nccl[0] + nccl[1]) - min(0, nccl[0])
    assert r["span_ms"] == pytest.approx(span / 1e3)
    assert r["exposed_pct"] == pytest.approx(100 * exposed_us / span)


def test_overlapping_streams_copies_and_cpu_events():
    events = [
        kernel(GEMM, 0, 100),
        kernel(NCCL, 100, 30),  # reduce-scatter and all-gather on two streams, overlapping each other:
        {**kernel("ncclDevKernel_AllGather_RING_LL", 110, 30), "tid": 9},  # the union counts, 100-140
        kernel("Memcpy DtoD (Device -> Device)", 100, 10, cat="gpu_memcpy"),  # copies hide it too
        kernel(GEMM, 135, 65),
        {"ph": "X", "cat": "cpu_op", "name": "nccl:all_reduce", "pid": 1, "tid": 1, "ts": 0, "dur": 500},
        {"ph": "X", "cat": "kernel", "name": NCCL, "pid": 0, "tid": 7, "ts": 300, "dur": 0},  # no duration
        {"ph": "i", "cat": "kernel", "name": NCCL, "pid": 0, "tid": 7, "ts": 300},  # not a complete event
    ]
    r = exposed_communication(events)[0]
    assert r["comm_ms"] == pytest.approx(0.040)
    assert r["exposed_ms"] == pytest.approx(0.025)  # 110-135
    assert r["span_ms"] == pytest.approx(0.200) and r["comm_kernels"] == 2


def test_devices_are_separate_and_an_empty_trace_is_an_error():
    events = [kernel(GEMM, 0, 100, 0), kernel(NCCL, 100, 50, 0)]
    events += [kernel(NCCL, 0, 50, 1), kernel(GEMM, 0, 20, 1)]
    r = exposed_communication(events)
    assert r[0]["exposed_ms"] == pytest.approx(0.050) and r[1]["exposed_ms"] == pytest.approx(0.030)
    only_compute = exposed_communication([kernel(GEMM, 0, 10)])[0]
    assert only_compute["comm_ms"] == only_compute["exposed_ms"] == 0.0
    with pytest.raises(ValueError, match="no GPU activity"):
        exposed_communication([{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}])


RECORD_BANKS = [(22, 512, 512), (22, 256, 512), (11, 2048, 512), (11, 512, 2048)]


def test_step_volume_of_the_record_banks():
    embedding = [(8192 * 512, 2)]  # the bf16 tied embedding's gradient
    two = step_volume(RECORD_BANKS, embedding, 2)
    padded_2 = 22 * 512 * 512 + 22 * 256 * 512 + 2 * 12 * 2048 * 512  # 11 matrices padded to 12
    assert two["reduce_scatter"] == two["all_gather"] == 0.5 * 2 * padded_2
    assert two["all_reduce"] == 2 * 0.5 * 8192 * 512 * 2
    assert two["total"] == two["reduce_scatter"] + two["all_gather"] + two["all_reduce"]
    eight = step_volume(RECORD_BANKS, embedding, 8)
    padded_8 = 24 * 512 * 512 + 24 * 256 * 512 + 2 * 16 * 2048 * 512  # 22 -> 24, 11 -> 16
    assert eight["reduce_scatter"] == 7 / 8 * 2 * padded_8
    assert step_volume(RECORD_BANKS, embedding, 1)["total"] == 0.0


def test_estimate_reproduces_the_measurement_and_grows_with_the_overhead():
    t1, t2 = 706.5, 361.5
    same = estimate_scaling(t1, t2, 2, exposed_n_ms=2.0, volume_n=1e8, target=2, volume_target=1e8)
    assert same["step_ms"] == pytest.approx(t2) and same["scaling"] == pytest.approx(t1 / (2 * t2))
    assert same["overhead_ms"] == pytest.approx(t2 - t1 / 2 - 2.0)
    eight = estimate_scaling(t1, t2, 2, exposed_n_ms=2.0, volume_n=1e8, target=8, volume_target=2e8)
    assert eight["exposed_comm_ms"] == pytest.approx(4.0)
    assert eight["step_ms"] == pytest.approx(t1 / 8 + same["overhead_ms"] + 4.0)
    assert eight["scaling"] < same["scaling"]  # a fixed per-rank overhead weighs more on a shorter step
    assert eight["wire_ms"] == pytest.approx(2e8 / 360e9 * 1e3)
    assert eight["step_ms_wire"] == pytest.approx(t1 / 8 + same["overhead_ms"] + eight["wire_ms"])
    perfect = estimate_scaling(800.0, 400.0, 2, exposed_n_ms=0.0, volume_n=0.0, target=8, volume_target=0.0)
    assert perfect["scaling"] == pytest.approx(1.0)
