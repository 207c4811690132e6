"""GPT (Llama family): embedding, N pre-norm blocks (RoPE GQA attention, SwiGLU MLP), final norm, LM head.

Read it as a single-device model: the spec supplies tensor-parallel layers, and the only sequence-parallel step
is `ulysses_attention` around the attention core, which is the identity when sp = 1; with a ring degree the core is
`ring_core`, ring attention over this ring rank's zig-zag shard (k/v blocks passing round the ring), so sp x ring is
Ulysses inside and the ring across (cfg.attention_core then picks the ring's block core: build_ring_block_core). A
MemoryConfig picks what is recomputed, offloaded or tiled (models/memory.py); none of it changes the math.
"""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalysses.parallel.kernel_fusion import fused
from megalysses.parallel.layout import ulysses_heads
from megalysses.parallel.mesh import ParallelMesh
from megalysses.parallel.sequence import (gather_sequence_ids, ring_core, ring_masks, shard_ring_sequence,
                                          token_weighted_loss, ulysses_attention)
from megalysses.parallel.tensor import param_info, shard, vocab_parallel_cross_entropy, vocab_parallel_logits

from .cores import Documents, build_attention_core, build_ring_block_core, resolve_auto_core
from .config import GPTConfig, MemoryConfig
from .memory import fused_lm_loss, map_sequence_tiles, recompute, recomputed, tiled_lm_loss
from .rope import apply_rope, rope_cos_sin, rope_inv_freq
from .spec import LayerSpec, layer_spec


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, spec: LayerSpec, mesh: ParallelMesh, memory: MemoryConfig = MemoryConfig(),
                 offload: bool = False):
        super().__init__()
        tp = mesh.size("tp")
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads // tp, cfg.num_kv_heads // tp, cfg.head_dim
        self.sp_group, self.ring_group = mesh.group("sp"), mesh.group("ring")
        self.qkv = spec.qkv(cfg.hidden_size, (cfg.q_size, cfg.kv_size, cfg.kv_size), cfg.qkv_bias, mesh,
                            eps=cfg.rms_norm_eps)
        if cfg.qk_norm:  # per head, before RoPE (Qwen3)
            self.q_norm = spec.norm(cfg.head_dim, cfg.rms_norm_eps, mesh, per_head=True)
            self.k_norm = spec.norm(cfg.head_dim, cfg.rms_norm_eps, mesh, per_head=True)
        self.qk_norm = cfg.qk_norm
        self.out = spec.attn_out(cfg.q_size, cfg.hidden_size, False, mesh)
        core_heads, core_kv_heads = ulysses_heads(self.sp_group.size, self.heads, self.kv_heads)  # after the all-to-all
        if self.ring_group.size > 1:  # the sp x ring hybrid: ring attention inside the Ulysses head-sharded region
            self.core = ring_core(self.ring_group, build_ring_block_core(cfg.attention_core))
        else:
            self.core = build_attention_core(cfg.attention_core, core_heads, core_kv_heads, cfg.head_dim,
                                             cfg.softmax_scale)
        self.scale = cfg.softmax_scale
        self.recompute_core = memory.recompute == "selective"  # inside the head-sharded region: no all-to-all re-run
        self.offload = offload

    def forward(self, x, cos, sin, docs):
        return self.out(self.attend(*self.project(x, cos, sin), docs).flatten(2))

    def project(self, x, cos, sin):
        """(b, s/sp, d) -> q (b, s/sp, h/tp, hd), k and v (b, s/sp, kv/tp, hd), q and k [normed and] rotated."""
        b, s = x.shape[0], cos.shape[1]  # s: this SP rank's tokens (the qkv layer gathers a TP-sharded sequence)
        q, k, v = self.qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                     self.kv_heads * self.head_dim], dim=-1)
        q, k = q.view(b, s, self.heads, self.head_dim), k.view(b, s, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.view(b, s, self.kv_heads, self.head_dim)

    def attend(self, q, k, v, docs):
        """Ulysses attention: all-to-all, the core on whole sequences (on a ring: ring attention over this ring rank's
        zig-zag shard, docs its RingMasks), all-to-all back -> (b, s/sp, h/tp, hd), s this ring rank's tokens."""
        core = recomputed(self.core, self.offload) if self.recompute_core else self.core
        return ulysses_attention(core, q, k, v, self.sp_group, docs=docs, scale=self.scale)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, spec: LayerSpec, mesh: ParallelMesh):
        super().__init__()
        self.gate_up = spec.gate_up(cfg.hidden_size, (cfg.intermediate_size, cfg.intermediate_size), False, mesh,
                                    eps=cfg.rms_norm_eps)
        self.down = spec.down(cfg.intermediate_size, cfg.hidden_size, False, mesh)

    def forward(self, x):
        return self.down(swiglu(self.gate_up(x)))  # (b, s, 2f/tp) -> (b, s, f/tp) -> (b, s, d)


@fused
def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on the concatenated gate / up projections: silu(gate) * up, (..., 2f) -> (..., f); one kernel on CUDA."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, spec: LayerSpec, mesh: ParallelMesh, memory: MemoryConfig = MemoryConfig(),
                 offload: bool = False):
        super().__init__()
        self.attn_norm = spec.attn_norm(cfg.hidden_size, cfg.rms_norm_eps, mesh)
        self.attn = Attention(cfg, spec, mesh, memory, offload)
        self.mlp_norm = spec.mlp_norm(cfg.hidden_size, cfg.rms_norm_eps, mesh)
        self.mlp = MLP(cfg, spec, mesh)
        self.mlp_tiles = memory.mlp_tiles
        self.around_core = memory.recompute == "around_core"
        self.offload = offload  # this layer's recomputed regions keep their inputs on the host

    def forward(self, x, cos, sin, docs):
        if self.around_core:  # keep the core's inputs and output; recompute the rest of the block from x and o
            q, k, v = recompute(self.normed_projection, x, cos, sin, offload=self.offload)
            o = self.attn.attend(q, k, v, docs)
            return recompute(self.after_core, x, o, offload=self.offload)
        x = x + self.attn(self.attn_norm(x), cos, sin, docs)
        return x + map_sequence_tiles(self.norm_mlp, self.mlp_tiles, x)  # token-wise: tiles over the sequence

    def normed_projection(self, x, cos, sin):
        """Pre-attention norm, QKV projection and RoPE."""
        return self.attn.project(self.attn_norm(x), cos, sin)

    def after_core(self, x, o):
        """Attention output projection and residual, then the MLP half of the block."""
        x = x + self.attn.out(o.flatten(2))
        return x + map_sequence_tiles(self.norm_mlp, self.mlp_tiles, x)

    def norm_mlp(self, x):
        """Pre-MLP norm + SwiGLU MLP: token-wise, so it may run over sequence tiles."""
        return self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """A Llama-family decoder on a mesh; with `layer_ids` / `pre_process` / `post_process` it is one pipeline stage."""

    def __init__(self, cfg: GPTConfig, mesh: Optional[ParallelMesh] = None, spec: Optional[LayerSpec] = None,
                 layer_ids: Optional[Sequence[int]] = None, pre_process: bool = True, post_process: bool = True,
                 memory: MemoryConfig = MemoryConfig()):
        super().__init__()
        spec = spec or layer_spec(cfg.backend)
        cfg = resolve_auto_core(cfg)
        memory.require_resolved()
        self.cfg, self.spec, self.memory = cfg, spec, memory
        self.mesh = mesh or ParallelMesh.single_device()
        self.mesh.layout.check_model(heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, layers=cfg.num_layers)
        self.tp_group, self.sp_group, self.ring_group = (self.mesh.group(a) for a in ("tp", "sp", "ring"))
        self.pre_process, self.post_process = pre_process, post_process
        layer_ids = range(cfg.num_layers) if layer_ids is None else layer_ids
        if pre_process or (post_process and cfg.tie_embeddings):
            self.embed = spec.embedding(cfg.vocab_size, cfg.hidden_size, self.mesh)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, spec, self.mesh, memory, memory.offloads_layer(i))
                                     for i in layer_ids})  # global ids
        if post_process:
            self.norm = spec.norm(cfg.hidden_size, cfg.rms_norm_eps, self.mesh)
            if not cfg.tie_embeddings:
                self.head = spec.embedding(cfg.vocab_size, cfg.hidden_size, self.mesh)  # same vocab sharding
        # float32 always (a buffer would follow model.to(bfloat16) and blur the angles at long positions)
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def default_positions(self, b: int, s_local: int, device) -> torch.Tensor:
        """Global positions of this rank's tokens (its SP chunk of its ring rank's zig-zag shard) when the caller
        gives none: the batch's own sharding applied to 0..s-1."""
        whole = torch.arange(s_local * self.sp_group.size * self.ring_group.size, device=device).unsqueeze(0)
        return shard_ring_sequence(whole, self.ring_group, self.sp_group).expand(b, s_local)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, hidden: Optional[torch.Tensor] = None,
                total_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(b, s/sp) token ids and global positions of this SP rank -> per-token loss (b, s/sp) if labels are
        given, else vocab-sharded logits (b, s/sp, padded vocab / tp). A later pipeline stage passes `hidden`.
        With labels and `total_valid` (the step's valid-token count): this rank's share of the token-weighted mean
        loss, a scalar (token_weighted_loss of the per-token loss, or the fused head + loss under memory.fused_loss)."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = self.default_positions(b, s, input_ids.device)
        docs = self.documents(position_ids)
        x = self.embed(input_ids) if self.pre_process else hidden  # (b, s/sp, d) [/tp with sequence_parallel]
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, x.dtype)
        for block in self.blocks.values():
            x = self.run_block(block, x, cos, sin, docs)
        if not self.post_process:
            return x
        x = self.norm(x)
        head = self.embed if self.cfg.tie_embeddings else self.head
        sequence_parallel = self.mesh.layout.tp_sequence_parallel
        if labels is not None and total_valid is not None:
            if self.memory.fused_loss:  # head, loss and their gradients chunk by chunk, in this forward
                tiles = self.memory.loss_tiles
                return fused_lm_loss(x, head.weight, labels, self.cfg.vocab_size, self.tp_group, sequence_parallel,
                                     total_valid, chunks=tiles if tiles > 1 else 0)
            return token_weighted_loss(self.per_token_loss(x, head.weight, labels).float(), labels, total_valid)
        if labels is not None:
            return self.per_token_loss(x, head.weight, labels)
        return vocab_parallel_logits(x, head.weight, self.tp_group, sequence_parallel)

    def per_token_loss(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """LM head + vocab-parallel cross-entropy: normed (b, s/sp, d) -> (b, s/sp), in sequence tiles under
        memory.loss_tiles (never the whole (b, s, vocab / tp) logits at once)."""
        sequence_parallel = self.mesh.layout.tp_sequence_parallel
        if self.memory.loss_tiles > 1:
            return tiled_lm_loss(x, weight, labels, self.cfg.vocab_size, self.tp_group, sequence_parallel,
                                 self.memory.loss_tiles)
        logits = vocab_parallel_logits(x, weight, self.tp_group, sequence_parallel)
        return vocab_parallel_cross_entropy(logits, labels, self.cfg.vocab_size, self.tp_group)

    def documents(self, position_ids: torch.Tensor):
        """Where attention may look, built once per forward for every layer: Documents of the whole (sp-gathered)
        sequence, or on a ring the RingMasks of this ring rank's (sp-gathered) zig-zag shard (causal by global index,
        per document)."""
        positions = gather_sequence_ids(position_ids, self.sp_group)  # what the core sees after the all-to-all
        if self.ring_group.size > 1:
            return ring_masks(self.ring_group, positions.shape[1], positions)
        return Documents.from_positions(positions)  # whole sequence

    def run_block(self, block: Block, x, cos, sin, docs):
        """One block; under full recompute only its input is kept (on the host with offload) and the rest re-run."""
        if self.memory.recompute == "full":
            return recompute(block, x, cos, sin, docs, offload=block.offload)
        return block(x, cos, sin, docs)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every parameter from its own seeded full tensor, then keep this rank's shard: any layout
        built from the same seed holds exactly the single-device weights."""
        tp = self.tp_group
        for name, p in self.canonical_parameters():
            info = param_info(p)
            p.copy_(shard(full_init(name, info.full_shape, self.cfg, seed), info.shard, tp.rank, tp.size))

    def canonical_parameters(self):
        """(backend-independent name, parameter) pairs: the names that init, checkpoints and HF adapters use."""
        for name, p in self.named_parameters():
            yield self.spec.canonical_name(name), p


def init_rule(name: str, cfg: GPTConfig) -> tuple[str, float]:
    """How a parameter starts, by canonical name: ('ones' | 'zeros' | 'normal', std). Norms 1, biases 0, weights
    N(0, init_std), residual projections (attention out, MLP down) scaled by 1/sqrt(2L)."""
    if name.endswith("norm.weight"):
        return "ones", 0.0
    if name.endswith(".bias"):
        return "zeros", 0.0
    std = cfg.init_std
    if name.endswith(("attn.out.weight", "mlp.down.weight")):
        std /= (2 * cfg.num_layers) ** 0.5
    return "normal", std


def _seed_of(name: str, seed: int) -> int:
    return seed * 1_000_003 + zlib.crc32(name.encode())


def full_init(name: str, shape, cfg: GPTConfig, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of a parameter, drawn on the CPU from a generator seeded by (seed, name):
    every layout holds exactly the same weights."""
    kind, std = init_rule(name, cfg)
    if kind != "normal":
        return torch.ones(shape) if kind == "ones" else torch.zeros(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(_seed_of(name, seed))) * std


@torch.no_grad()
def init_on_device(model: GPT, seed: int = 0) -> None:
    """Draw every local parameter (shard) on its own device by init_rule: seconds for billions of weights, the same
    distribution as init_weights but not its values (and not layout-independent). For throughput runs."""
    for name, p in model.canonical_parameters():
        kind, std = init_rule(name, model.cfg)
        if kind == "normal":
            p.normal_(0.0, std, generator=torch.Generator(p.device).manual_seed(_seed_of(name, seed)))
        else:
            p.fill_(1.0 if kind == "ones" else 0.0)
