"""Where a profiled training step's time goes, by kind of work: matmul, attention, communication, optimizer,
elementwise, norms/other, and idle (the step's wall time with no kernel running).

On CUDA the kinds sum the device kernels (memcpy / memset included) of a torch.profiler trace; on the CPU (the check
runs) they sum the self time of the aten and collective ops, classified by the same names.
"""
from __future__ import annotations

from typing import Iterable

KERNEL_KINDS = (
    ("communication", ("nccl", "c10d::", "gloo", "record_param_comms")),
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "cudnn")),
    ("optimizer", ("adam", "multi_tensor_apply", "_foreach_")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::baddbmm", "aten::linear")),
    ("norms/other", ("triton_red", "triton_per", "reduce_kernel", "norm", "softmax", "cross_entropy")),
    ("elementwise", ("elementwise", "triton_poi", "memcpy", "memset", "copy", "fill", "catarray", "swiglu", "rope",
                     "aten::add", "aten::sub", "aten::mul", "aten::div", "aten::neg", "aten::silu", "aten::exp",
                     "aten::where", "aten::masked_fill", "aten::cat", "aten::clone", "aten::to", "aten::_to_copy",
                     "aten::zero_", "aten::threshold_backward", "aten::sigmoid", "aten::pow", "aten::rsqrt", "aten::sqrt", "aten::lerp", "aten::addcdiv",
                     "aten::addcmul")),
)
"""(kind, name fragments), checked in order (a cuDNN or CUTLASS attention kernel is attention, not matmul; a compiled
reduction that also casts is a reduction); a name that matches none is norms/other."""

KINDS = ("matmul", "attention", "elementwise", "norms/other", "optimizer", "communication")
"""Every kind a kernel can have; norms/other: reductions (norms, the loss's softmax passes), embedding, the rest."""


def kernel_kind(name: str) -> str:
    """The kind of work a GPU kernel (or CPU aten op) does, by its name."""
    low = name.lower()
    for kind, marks in KERNEL_KINDS:
        if any(m in low for m in marks):
            return kind
    return "norms/other"


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, each overlap counted once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _on_device(event) -> bool:
    return str(getattr(event, "device_type", "")).endswith("CUDA")


def _counted_on_cpu(event) -> bool:
    """A CPU op whose self time is work: an aten op or a collective (not Python or autograd-engine wrappers)."""
    return event.name.startswith("aten::") or kernel_kind(event.name) == "communication"


def _in_optimizer_step(event) -> bool:
    """Whether a CPU op ran inside torch's `Optimizer.step` (its profiler scope), e.g. the unfused AdamW's ops."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return True
        parent = parent.cpu_parent
    return False


def cpu_op_kind(event) -> str:
    """The kind of a CPU op: optimizer inside Optimizer.step, else by its name."""
    return "optimizer" if _in_optimizer_step(event) else kernel_kind(event.name)


def step_breakdown(events, wall_us: float, device: bool) -> dict[str, float]:
    """Microseconds by kind in one step of wall time `wall_us` (profiler events of that step); with `device` the GPU
    kernels, else the CPU ops' self time. Adds 'idle' (wall time with nothing running) and, where kernels ran on
    several streams at once, 'overlap' (the time counted twice by the kinds, subtracted so that the rows sum to
    the wall time)."""
    by_kind = dict.fromkeys(KINDS, 0.0)
    busy = []
    for e in events:
        if device and _on_device(e):
            start, end = e.time_range.start, e.time_range.end
            by_kind[kernel_kind(e.name)] += end - start
            busy.append((start, end))
        elif not device and not _on_device(e) and _counted_on_cpu(e):
            by_kind[cpu_op_kind(e)] += e.self_cpu_time_total
    covered = union_length(busy) if device else sum(by_kind.values())
    by_kind["overlap"] = -(sum(by_kind.values()) - covered)
    by_kind["idle"] = max(0.0, wall_us - covered)
    return by_kind


def breakdown_table(breakdown: dict[str, float], wall_us: float, where: str) -> str:
    """The breakdown as a markdown table of ms and % of the step."""
    lines = [f"| kind ({where}) | ms | % of step |", "|---|---:|---:|"]
    for kind, us in breakdown.items():
        if kind == "overlap" and us == 0:
            continue
        lines.append(f"| {kind} | {us / 1e3:.1f} | {us / wall_us:.1%} |")
    lines.append(f"| step (wall) | {wall_us / 1e3:.1f} | 100.0% |")
    return "\n".join(lines)
