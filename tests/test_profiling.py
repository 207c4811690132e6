"""Step time by kind (megalysses/profiling.py): kernel names -> kinds, idle and overlap from kernel intervals, and
scripts/profile_step.py --tiny printing the table."""
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megalysses.profiling import KINDS, breakdown_table, kernel_kind, step_breakdown, union_length

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_step.py"


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "matmul"),
    ("aten::addmm", "matmul"),
    ("void cutlass::device_kernel<flash::FlashAttnFwdSm90<...>>", "attention"),  # CUTLASS, but attention
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("c10d::allreduce_", "communication"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
    ("triton_poi_fused_add_cat_mul_neg_slice_0", "elementwise"),
    ("Memcpy DtoD (Device -> Device)", "elementwise"),
    ("_swiglu_forward_kernel", "elementwise"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norms/other"),  # a reduction that also casts
    ("_rms_norm_backward_kernel", "norms/other"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MaxOps<float>>>", "norms/other"),
    ("void at::native::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>", "norms/other"),
])
def test_kernel_kinds(name, kind):
    assert kernel_kind(name) == kind


def test_union_length_counts_overlaps_once():
    assert union_length([]) == 0
    assert union_length([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert union_length([(20, 30), (0, 40)]) == 40


def kernel(name, start, end):
    return SimpleNamespace(name=name, device_type="DeviceType.CUDA", time_range=SimpleNamespace(start=start, end=end))


def test_device_breakdown_sums_to_the_wall_time():
    events = [kernel("sm90_xmma_gemm", 10, 50), kernel("ncclDevKernel_AllReduce", 40, 70),  # nccl beside the gemm
              kernel("flash_fwd", 70, 90), kernel("vectorized_elementwise_kernel", 95, 100),
              SimpleNamespace(name="aten::mm", device_type="DeviceType.CPU", self_cpu_time_total=1e6)]  # CPU: ignored
    got = step_breakdown(events, wall_us=120, device=True)
    assert got == {"matmul": 40, "attention": 20, "elementwise": 5, "norms/other": 0, "optimizer": 0,
                   "communication": 30, "overlap": -10, "idle": 120 - 85}
    assert sum(got.values()) == 120
    table = breakdown_table(got, 120, "GPU kernels")
    assert "| idle | 0.0 | 29.2% |" in table and "| overlap | -0.0 | -8.3% |" in table


def test_cpu_breakdown_counts_aten_self_time_and_the_optimizer_scope():
    step = SimpleNamespace(name="Optimizer.step#AdamW.step", device_type="DeviceType.CPU", cpu_parent=None,
                           self_cpu_time_total=7.0)
    events = [SimpleNamespace(name="aten::lerp_", device_type="DeviceType.CPU", cpu_parent=step, self_cpu_time_total=3.0),
              SimpleNamespace(name="aten::lerp_", device_type="DeviceType.CPU", cpu_parent=None, self_cpu_time_total=2.0),
              SimpleNamespace(name="aten::mm", device_type="DeviceType.CPU", cpu_parent=None, self_cpu_time_total=5.0),
              SimpleNamespace(name="autograd::engine::evaluate_function: MmBackward0", device_type="DeviceType.CPU",
                              cpu_parent=None, self_cpu_time_total=9.0), step]  # wrappers: not work
    got = step_breakdown(events, wall_us=20, device=False)
    assert (got["optimizer"], got["elementwise"], got["matmul"], got["idle"], got["overlap"]) == (3, 2, 5, 10, 0)


def test_profile_step_tiny_prints_every_kind():
    out = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--warmup", "1", "--steps", "1", "--top", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = dict(re.findall(r"^\| ([a-z/ ()]+) \| ([\d.]+) \| [\d.]+% \|$", out.stdout, re.M))
    assert set(KINDS) | {"idle", "step (wall)"} <= set(rows), out.stdout
    assert float(rows["matmul"]) > 0 and float(rows["attention"]) > 0 and float(rows["optimizer"]) > 0
    parts = sum(float(rows[k]) for k in rows if k != "step (wall)")
    assert parts == pytest.approx(float(rows["step (wall)"]), abs=0.1 * len(rows))  # rounded to 0.1 ms each
    assert "| aten::mm | matmul |" in out.stdout
