"""Memory savers (recompute, host offload, tiled MLP, tiled logits + loss) leave the loss and every gradient unchanged
(fp32), on one device and under tensor (sequence-parallel), Ulysses and ring parallelism, and really drop what they
say."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megalysses.parallel.tensor import param_info
from megalysses.config import ConfigError, RunConfig, load_run_config
from megalysses.models import memory as memory_module
from megalysses.models.config import GPTConfig, MemoryConfig, ModelConfigError
from megalysses.models.gpt import GPT
from megalysses.parallel import ParallelLayout, ParallelMesh
from megalysses.parallel import collectives as C
from megalysses.parallel.dp import all_reduce_gradients
from megalysses.parallel.launch import run_ranks
from megalysses.parallel.sequence import (IGNORE_INDEX, count_valid_tokens, pad_sequence_batch, shard_ring_sequence,
                                          token_weighted_loss)
from megalysses.parallel.tensor import gather_full
from parity import SEED, compare, make_batch, reference

# GQA; distinct sizes so shapes identify tensors: hidden 64, heads 4 x 16, kv 2, intermediate 96, vocab 101, seq 30
CFG = GPTConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
B, S = 2, 30

SAVERS = {
    "selective": MemoryConfig(recompute="selective"),
    "selective+offload": MemoryConfig(recompute="selective", offload_activations=True),
    "around_core": MemoryConfig(recompute="around_core"),
    "around_core+offload+tiles": MemoryConfig(recompute="around_core", offload_activations=True, mlp_tiles=3),
    "full": MemoryConfig(recompute="full"),
    "full+offload": MemoryConfig(recompute="full", offload_activations=True),
    "mlp_tiles": MemoryConfig(mlp_tiles=4),
    "loss_tiles": MemoryConfig(loss_tiles=4),
    "all": MemoryConfig(recompute="full", offload_activations=True, mlp_tiles=3, loss_tiles=7),
}


def single_device(cfg: GPTConfig, batch, memory: MemoryConfig, device="cpu"):
    """Mean loss over valid tokens and every gradient of a single-device GPT built with `memory`."""
    model = GPT(cfg, memory=memory)
    model.init_weights(SEED)
    model.to(device)
    labels = batch.labels.to(device)
    pos = None if batch.position_ids is None else batch.position_ids.to(device)
    valid = labels != IGNORE_INDEX
    loss = (model(batch.input_ids.to(device), pos, labels) * valid).sum() / valid.sum()
    loss.backward()
    return loss.item(), {n: p.grad.cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
def test_each_saver_matches_the_plain_model(packed):
    batch = make_batch(CFG, batch=B, seq=S, packed=packed, ignore_tail=5)
    plain = single_device(CFG, batch, MemoryConfig())
    for name, memory in SAVERS.items():
        loss_err, grad_err, worst = compare(plain, single_device(CFG, batch, memory))
        assert loss_err < 1e-6, name
        assert grad_err < 1e-5, f"{name}: {worst}"


def test_tied_embeddings_with_tiled_loss():
    cfg = GPTConfig(vocab_size=101, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=96,
                    tie_embeddings=True)
    batch = make_batch(cfg, batch=B, seq=S)
    loss_err, grad_err, worst = compare(single_device(cfg, batch, MemoryConfig()),
                                        single_device(cfg, batch, SAVERS["all"]))
    assert loss_err < 1e-6 and grad_err < 1e-5, worst


# ---------------------------------------------------------------------- what each saver keeps and recomputes


def census(memory: MemoryConfig):
    """Shapes of the tensors the blocks keep for backward (what recompute drops is not kept), and how often the
    recomputable parts are called over one forward + backward."""
    model = GPT(CFG, memory=memory)
    model.init_weights(SEED)
    params = {p.data_ptr() for p in model.parameters()}
    calls, inside = {"block": 0, "core": 0, "mlp": 0}, [False]

    def count(name):
        return lambda *a: calls.__setitem__(name, calls[name] + 1)

    for block in model.blocks.values():
        block.register_forward_pre_hook(count("block"))
        block.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
        block.register_forward_hook(lambda *a: inside.__setitem__(0, False))
        block.mlp.register_forward_pre_hook(count("mlp"))
        core = block.attn.core
        block.attn.core = lambda *a, _core=core, **k: count("core")() or _core(*a, **k)
    kept = []

    def pack(t):
        if inside[0] and t.data_ptr() not in params:
            kept.append(tuple(t.shape))
        return t

    batch = make_batch(CFG, batch=B, seq=S)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch.input_ids, labels=batch.labels).mean()
    loss.backward()
    return kept, calls


def test_savers_drop_what_they_say():
    layers, heads, f = CFG.num_layers, CFG.num_heads, CFG.intermediate_size
    kept, calls = census(MemoryConfig())
    assert calls == {"block": layers, "core": layers, "mlp": layers}
    assert (B, heads, S) in kept and any(f in s for s in kept)  # the core's softmax statistics; MLP activations

    kept, calls = census(MemoryConfig(recompute="selective"))
    assert calls == {"block": layers, "core": 2 * layers, "mlp": layers}  # the core alone runs again
    assert (B, heads, S) not in kept and (B, S, heads, CFG.head_dim) in kept  # keeps q, k, v; drops what SDPA saves

    kept, calls = census(MemoryConfig(recompute="full"))
    assert kept == [] and calls["block"] == 2 * layers  # only the inputs, saved by the caller; whole block re-run

    kept, calls = census(MemoryConfig(recompute="around_core"))
    assert calls == {"block": layers, "core": layers, "mlp": 2 * layers}  # all but the core runs again
    assert (B, heads, S) in kept and not any(f in s for s in kept)  # the core's statistics; no MLP activation

    kept, calls = census(MemoryConfig(mlp_tiles=3))
    assert not any(f in s for s in kept) and calls["mlp"] == 2 * 3 * layers  # no MLP activation; each tile re-run

    kept, calls = census(MemoryConfig(recompute="full", mlp_tiles=3))  # tiles nested in the recomputed block
    assert kept == [] and calls["mlp"] > 2 * 3 * layers, calls


def test_offload_moves_exactly_the_recomputed_inputs(monkeypatch):
    packed, unpacked = [], []
    pack, unpack = memory_module._pack_to_host, memory_module._unpack_from_host
    monkeypatch.setattr(memory_module, "_pack_to_host", lambda t: packed.append(tuple(t.shape)) or pack(t))
    monkeypatch.setattr(memory_module, "_unpack_from_host", lambda p: unpacked.append(1) or unpack(p))
    batch = make_batch(CFG, batch=B, seq=S)
    single_device(CFG, batch, MemoryConfig(recompute="full", offload_activations=True))
    hd = CFG.head_dim
    assert packed == [(B, S, CFG.hidden_size), (B, S, 1, hd), (B, S, 1, hd)] * CFG.num_layers  # x, cos, sin
    assert len(unpacked) == len(packed)
    packed.clear()
    single_device(CFG, batch, MemoryConfig(recompute="selective", offload_activations=True))
    assert packed == [(B, S, CFG.num_heads, hd), (B, S, CFG.num_kv_heads, hd), (B, S, CFG.num_kv_heads, hd)] * 2
    packed.clear()
    single_device(CFG, batch, MemoryConfig(recompute="around_core", offload_activations=True))
    x, angle, o = (B, S, CFG.hidden_size), (B, S, 1, hd), (B, S, CFG.num_heads, hd)
    assert packed == [x, angle, angle, x, o] * CFG.num_layers  # the projection's x, cos, sin; the rest's x and o


class LargestLogits(TorchDispatchMode):
    """Records the most rows of any tensor made with the (local) vocab as its last dim: logits, softmax, their
    gradient (not the head's weight gradient, which the matmul may lay out as (hidden, vocab))."""

    def __init__(self, vocab: int, hidden: int = CFG.hidden_size):
        super().__init__()
        self.vocab, self.weight_t, self.rows = vocab, (hidden, vocab), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab and t.shape != self.weight_t:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("tiles,rows", [(1, B * S), (4, B * 8), (30, B * 1)])
def test_tiled_loss_never_holds_the_full_logits(tiles, rows):
    batch = make_batch(CFG, batch=B, seq=S)
    spy, kept = LargestLogits(CFG.vocab_size), []
    with spy, torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        single_device(CFG, batch, MemoryConfig(loss_tiles=tiles))  # forward and backward
    assert spy.rows == rows  # the largest vocab-wide tensor ever made: one tile's
    vocab_wide_kept = [s for s in kept if s and s[-1] == CFG.vocab_size and s != spy.weight_t]
    assert vocab_wide_kept == ([(B * S, CFG.vocab_size)] if tiles == 1 else [])  # tiles' softmax recomputed, not kept


def test_without_labels_the_logits_are_returned():
    model = GPT(CFG, memory=MemoryConfig(loss_tiles=4))
    model.init_weights(SEED)
    assert model(torch.zeros(B, S, dtype=torch.long)).shape == (B, S, CFG.vocab_size)


# --------------------------------------------------------------------------------------------------- config


def test_memory_config_errors_and_run_config_section(tmp_path):
    with pytest.raises(ModelConfigError, match=r"memory.recompute = 'some'.*none, selective, around_core, full"):
        MemoryConfig(recompute="some")
    with pytest.raises(ModelConfigError, match=r"memory.loss_tiles = 0: must be >= 1"):
        MemoryConfig(loss_tiles=0)
    with pytest.raises(ModelConfigError, match=r"set memory.recompute to 'full', 'around_core' or 'selective'"):
        MemoryConfig(offload_activations=True)
    assert RunConfig().memory == MemoryConfig()
    run = tmp_path / "run.yaml"
    run.write_text("model: tiny\nmemory:\n  recompute: full\n  loss_tiles: 8\n")
    cfg = load_run_config(run, ["memory.mlp_tiles=4"])
    assert cfg.memory == MemoryConfig(recompute="full", mlp_tiles=4, loss_tiles=8)
    with pytest.raises(ConfigError, match=r"memory.recompute: expected one of 'none', 'selective', 'around_core', 'full'"):
        load_run_config(run, ["memory.recompute=partial"])


# ------------------------------------------------------------------------------------------------ multi-rank


def sharded(cfg, mesh: ParallelMesh, batch, memory: MemoryConfig):
    """tests/parity.py's `sharded` with a MemoryConfig (and a mesh built once): loss and gathered full gradients."""
    model = GPT(cfg, mesh, memory=memory)
    model.init_weights(SEED)
    ring, sp = mesh.group("ring"), mesh.group("sp")
    ids, labels, pos = pad_sequence_batch(batch.input_ids, batch.labels, batch.position_ids, mesh.layout.sequence_unit)
    ids, labels, pos = (shard_ring_sequence(t, ring, sp) for t in (ids, labels, pos))
    total = count_valid_tokens(labels, mesh.data_group())
    spy = LargestLogits(_local_vocab(model))
    with spy:
        loss = token_weighted_loss(model(ids, pos, labels), labels, total)
        loss.backward()
    all_reduce_gradients(model.parameters(), mesh)
    reported = C.all_reduce(loss.detach().clone(), mesh.data_group()).item()
    grads = {n: gather_full(p.grad, param_info(p).shard, mesh.group("tp")) for n, p in model.named_parameters()}
    return (reported, grads), spy.rows


def _local_vocab(model: GPT) -> int:
    return (model.embed if model.cfg.tie_embeddings else model.head).weight.shape[0]


def savers_on_rank(rank, world, cfg, layout, batch, memories):
    """Rank body: the single-device reference against the sharded model under each MemoryConfig."""
    mesh = ParallelMesh(layout)
    ref = reference(cfg, batch)
    out = []
    for memory in memories:
        got, rows = sharded(cfg, mesh, batch, memory)
        out.append((*compare(ref, got), rows))
    return out


RANK_SAVERS = [SAVERS["selective+offload"], MemoryConfig(mlp_tiles=3), MemoryConfig(loss_tiles=4), SAVERS["all"],
               SAVERS["around_core+offload+tiles"]]


@pytest.mark.parametrize("layout,tokens_per_rank", [
    pytest.param(ParallelLayout(tp=2, tp_sequence_parallel=True), S, id="tp2-seqpar"),  # head input gathered: all 30
    pytest.param(ParallelLayout(sp=2), S // 2, id="sp2"),
    pytest.param(ParallelLayout(tp=2, sp=2, tp_sequence_parallel=True), 16, id="tp2-sp2-seqpar"),  # padded to 32
    pytest.param(ParallelLayout(ring=2), 16, id="ring2"),  # padded to 32
    pytest.param(ParallelLayout(sp=2, ring=2), 8, id="sp2-ring2"),
])
def test_savers_match_single_device_on_ranks(layout, tokens_per_rank):
    batch = make_batch(CFG, batch=B, seq=S, packed=True, ignore_tail=5)
    for rank_result in run_ranks(savers_on_rank, layout.model_parallel_size, CFG, layout, batch, RANK_SAVERS):
        for memory, (loss_err, grad_err, worst, rows) in zip(RANK_SAVERS, rank_result):
            assert loss_err < 1e-6, memory
            assert grad_err < 1e-5, f"{memory}: {worst}"
            tiles = memory.loss_tiles
            assert rows == B * -(-tokens_per_rank // tiles), memory  # one tile's logits at most


# ------------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_offload_to_pinned_memory_on_gpu(monkeypatch):
    hosts = []
    pack = memory_module._pack_to_host
    monkeypatch.setattr(memory_module, "_pack_to_host", lambda t: (lambda p: hosts.append(p[1]) or p)(pack(t)))
    batch = make_batch(CFG, batch=B, seq=S, packed=True)
    plain = single_device(CFG, batch, MemoryConfig(), device="cuda")
    loss_err, grad_err, worst = compare(plain, single_device(CFG, batch, SAVERS["all"], device="cuda"))
    assert all(h.device.type == "cpu" for h in hosts)
    copied = [h for h in hosts if h.numel() > 0]  # an empty tensor has nothing to copy: it is never pinned
    assert copied and all(h.is_pinned() for h in copied), [(tuple(h.shape), h.is_pinned()) for h in hosts]
    assert loss_err < 1e-6 and grad_err < 1e-5, worst
