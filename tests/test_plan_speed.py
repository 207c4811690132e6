"""The speed model's parts follow each layout (Ulysses all-to-alls, tp collectives, pipeline bubble, ZeRO), the
optimizer host offload moves the right bytes, and every device rate says where it comes from."""

import pytest

from megalysses.parallel.dp.zero import PIECE_NUMEL

from megalysses.config import load_run_config
from megalysses.parallel import ParallelLayout
from megalysses.parallel.pipeline.schedules import ideal_bubble_fraction
from megalysses.plan import capacity_for_device, device_rates, evaluate, state_bytes
from megalysses.plan.speed import rate_sources

SAVERS = ["memory.recompute=none", "memory.offload_activations=false", "memory.mlp_tiles=1", "memory.loss_tiles=8",
          "memory.fused_loss=false"]


def predicted(layout: str, world: int, *extra: str):
    cfg = load_run_config("gpu-bench", ["model=llama-3-8b", "train.seq_len=32768", "model.max_seq_len=32768",
                                        f"layout={layout}", *SAVERS, *extra])
    return evaluate(cfg, world, capacity_for_device("h200", ranks_per_host=min(world, 8)))


def test_each_layout_pays_its_own_communication():
    single = predicted("single", 1, "model.num_layers=8").time.parts
    sp = predicted("sp4", 4).time.parts
    tp = predicted("tp2", 2).time.parts
    assert single["Ulysses all-to-all"] == single["tensor-parallel collectives"] == 0
    assert sp["Ulysses all-to-all"] > 0 and sp["tensor-parallel collectives"] == 0
    assert tp["tensor-parallel collectives"] > 0 and tp["Ulysses all-to-all"] == 0


def test_pipeline_bubble_follows_the_schedule():
    c = predicted("pp4", 4, "train.global_batch_size=8", "layout.schedule=gpipe")
    parts = c.time.parts
    busy = sum(v for k, v in parts.items() if k in ("matmuls + attention", "elementwise", "Ulysses all-to-all",
                                                      "tensor-parallel collectives"))
    assert parts["pipeline bubble"] == pytest.approx(busy * ideal_bubble_fraction("gpipe", 4, 1, 8))
    assert c.memory_plan.device_total > predicted("pp4", 4, "train.global_batch_size=8").memory_plan.device_total


def test_recompute_costs_time_and_saves_memory():
    none, full = predicted("sp4", 4), predicted("sp4", 4, "memory.recompute=full")
    assert full.time.seconds > none.time.seconds and full.memory_plan.device_total < none.memory_plan.device_total
    assert full.time.mfu < none.time.mfu  # MFU counts model FLOPs only


def test_optimizer_offload_moves_masters_and_moments_to_the_host():
    cfg = load_run_config("gpu-bench", ["model=llama-3.2-1b"])
    for zero, world in ((0, 1), (1, 4)):
        layout = ParallelLayout(dp=world, zero=zero)
        on, off = (state_bytes(cfg.model, layout, 2, offload_optimizer=o) for o in (False, True))
        assert off.host_masters == on.masters and off.host_moments == 2 * on.masters  # padded blocks of 3 rows
        assert off.masters == off.moments == 0 and off.params == on.params and off.main_grads == on.main_grads
        piece = min(on.largest_bucket // (world if zero else 1), PIECE_NUMEL)  # offload moves pieces of at most
        assert off.staging == 3 * piece * 12  # PIECE_NUMEL elements: three slots of the largest
    on, off = (state_bytes(cfg.model, ParallelLayout(dp=4, zero=3), 2, offload_optimizer=o) for o in (False, True))
    assert (off.host_grads, off.host_moments) == (on.main_grads, on.moments) and off.host_params <= on.params
    assert off.params == off.main_grads == off.moments == 0 and off.gathered_units == on.gathered_units


@pytest.mark.parametrize("device", ["h200", "h100"])
def test_every_rate_names_its_source(device):
    rates, sources = device_rates(device), rate_sources(device)
    assert set(rates) == set(sources) and all(len(s) > 10 for s in sources.values())
    assert rates["matmul_tflops"] < rates["peak_tflops"]
