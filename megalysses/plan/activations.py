"""Activation memory of one rank: what each block keeps for backward under each memory saver, where (device or host),
and the working set of the moment the peak is reached.

The tensors below are the ones models/gpt.py and models/memory.py save, named after the code that saves them
(a view keeps its whole base alive, so a saved `v` keeps the whole QKV projection output):

  norm (RMSNorm, eager)   its float32 input, the rstd (one float per token), the normalised value (w * y saves y)
  norm (fused on CUDA)    its input and the rstd (torch.compile recomputes the rest)
  qkv projection          its input (the norm output, or its tp-sequence gather)
  RoPE                    only cos / sin, once per forward for every layer
  attention core          q, k, v as it gets them, its output, the softmax log-sum-exp (float32 per head and token)
  Ulysses (sp > 1)        nothing; the all-to-alls make new tensors (the core's q, k, v and the output back)
  out projection          its input (the core output itself when sp = 1)
  SwiGLU (eager)          gate_up output (through the gate view), silu(gate); (fused) gate_up output only
  down projection         its input
  recompute(fn, *args)    only args (each on the host with offload); fn's own saves come back in backward
Sizes are bytes for one micro-batch on this rank: T = b * s / (sp * ring) tokens in the sequence-sharded region,
Tr = T / tp of them in the residual stream under tp_sequence_parallel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megalysses.models.config import GPTConfig, MemoryConfig
from megalysses.parallel.layout import ParallelLayout, ulysses_heads
from megalysses.parallel.tensor.fused_cross_entropy import chunk_rows_for

FP32, INT64, BOOL = 4, 8, 1


@dataclass(frozen=True)
class Shapes:
    """One rank's activation sizes in bytes for one micro-batch, by named tensor of one block (and the head)."""

    model: GPTConfig
    layout: ParallelLayout
    micro_batch: int
    seq_len: int
    act: int
    """Bytes per activation element: 2 under bf16 autocast, 4 in float32."""
    eager: bool
    """Unfused elementwise chains (CPU); False: the torch.compile'd chains of CUDA (models' @fused)."""

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len // (self.layout.sp * self.layout.ring)

    @property
    def residual_tokens(self) -> int:
        return self.tokens // self.layout.tp if self.layout.tp_sequence_parallel else self.tokens

    def _heads(self) -> tuple[int, int]:
        tp, m = self.layout.tp, self.model
        return m.num_heads // tp, m.num_kv_heads // tp

    def sizes(self) -> dict[str, int]:
        """Every tensor a block (or its norms) may keep, by name."""
        m, T, Tr, a = self.model, self.tokens, self.residual_tokens, self.act
        d, hd, tp, sp = m.hidden_size, m.head_dim, self.layout.tp, self.layout.sp
        heads, kv_heads = self._heads()
        q, kv, f = heads * hd, kv_heads * hd, m.intermediate_size // tp
        _, core_kv = ulysses_heads(sp, heads, kv_heads)
        out = {"x": Tr * d * a, "x1": Tr * d * a}  # block input; residual after attention (the MLP's input)
        for norm in ("attn_norm", "mlp_norm"):
            out[f"{norm}.rstd"] = Tr * FP32
            if self.eager:
                out[f"{norm}.fp32_input"] = Tr * d * FP32  # x.float(): x itself when a = 4
                out[f"{norm}.normalised"] = Tr * d * a
        out["qkv.input"] = T * d * a
        out["gate_up.input"] = T * d * a
        out["qkv.output"] = T * (q + 2 * kv) * a
        out["q.rotated"], out["k.rotated"], out["v"] = T * q * a, T * kv * a, T * kv * a
        out["core.q"], out["core.k"], out["core.v"] = T * q * a, T * core_kv * sp * hd * a, T * core_kv * sp * hd * a
        out["core.output"] = T * q * a
        out["core.lse"] = T * heads * FP32
        out["core.dq_accum"] = T * q * FP32  # flash-style backward: the query gradient accumulated in float32
        out["attn.output"] = T * q * a  # seq-sharded again after the all-to-all back (sp > 1)
        out["gate_up.output"] = T * 2 * f * a
        out["silu"] = T * f * a
        out["down.input"] = T * f * a
        out["cos_sin"] = 2 * T * hd * a
        return out

    def _norm_saves(self, norm: str, input_name: str) -> set[str]:
        if self.eager:  # F.rms_norm keeps the float32 input (x itself in float32), rstd; the weight product y
            first = input_name if self.act == FP32 else f"{norm}.fp32_input"
            return {first, f"{norm}.rstd", f"{norm}.normalised"}
        return {input_name, f"{norm}.rstd"}

    def attention_saves(self) -> set[str]:
        """The attention half with nothing recomputed (the block input x's own saves included)."""
        sp1 = self.layout.sp == 1
        core_inputs = {"q.rotated", "k.rotated", "qkv.output"} if sp1 else {"core.q", "core.k", "core.v"}
        outputs = {"core.output"} if sp1 else {"core.output", "attn.output"}
        return self._norm_saves("attn_norm", "x") | {"qkv.input"} | core_inputs | outputs | {"core.lse"}

    def core_inputs_as_passed(self) -> dict[str, int]:
        """What recompute(core, q, k, v) copies to the host: the tensors themselves (v: the view, not its base)."""
        s = self.sizes()
        if self.layout.sp == 1:
            return {"q.rotated": s["q.rotated"], "k.rotated": s["k.rotated"], "v": s["v"]}
        return {k: s[k] for k in ("core.q", "core.k", "core.v")}

    def mlp_saves(self) -> set[str]:
        """The MLP half (pre-MLP norm + SwiGLU) with nothing recomputed."""
        swiglu = {"gate_up.output", "silu"} if self.eager else {"gate_up.output"}
        return self._norm_saves("mlp_norm", "x1") | {"gate_up.input"} | swiglu | {"down.input"}

    def head_saves(self, memory: MemoryConfig) -> dict[str, int]:
        """The final norm, LM head and loss of the last stage: logits kept for the cross-entropy's backward, or with
        loss tiles only the head input."""
        m, T, Tr, a = self.model, self.tokens, self.residual_tokens, self.act
        d = m.hidden_size
        vocab = -(-m.vocab_size // self.layout.tp)
        norm = {"final_norm.rstd": Tr * FP32}
        if self.eager:
            norm.update({"final_norm.fp32_input": Tr * d * FP32, "final_norm.normalised": Tr * d * a})
        else:
            norm["final_norm.input"] = Tr * d * a
        if memory.fused_loss:  # the gradients formed in forward, kept for backward (the head input is not)
            return {**norm, "head.grad_input": T * d * a, "head.grad_weight": vocab * d * a,
                    "loss.targets": T * (INT64 + FP32)}
        if memory.loss_tiles > 1:
            return {**norm, "head.input": T * d * a, "labels": T * INT64}
        return {**norm, "head.input": T * d * a, "logits": T * vocab * a,
                "loss.stats": T * (2 * FP32 + INT64 + BOOL)}

    def loss_working(self, memory: MemoryConfig) -> int:
        """Transient bytes at the loss's backward on top of what it saved: the logits' gradient (and, eager, the
        float32 softmax passes); with tiles, one tile's logits, their gradient and passes."""
        T, a, vocab = self.tokens, self.act, -(-self.model.vocab_size // self.layout.tp)
        passes = 3 * FP32 + BOOL if self.eager else 0  # the float32 softmax passes of the unfused kernels
        if memory.fused_loss:  # one chunk's logits and their gradient, the float32 head-weight gradient accumulator
            rows = chunk_rows_for(T, vocab, memory.loss_tiles if memory.loss_tiles > 1 else 0)
            return rows * vocab * (2 * a + passes) + vocab * self.model.hidden_size * FP32
        rows = -(-T // memory.loss_tiles) if memory.loss_tiles > 1 else T
        tile_logits = rows * vocab * a if memory.loss_tiles > 1 else 0
        return rows * vocab * (a + passes) + tile_logits


@dataclass(frozen=True)
class BlockMemory:
    """One block's activations for one micro-batch: kept on the device and on the host until its backward, and the
    transient working set of its backward (recomputed tensors, gradients, all-to-all buffers)."""

    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    working: int = 0


def _total(shapes: Shapes, names: set[str]) -> int:
    s = shapes.sizes()
    return sum(s[n] for n in names)


def block_memory(shapes: Shapes, memory: MemoryConfig) -> BlockMemory:
    """What one block keeps under memory.recompute / offload_activations / mlp_tiles (MemoryConfig resolved)."""
    s = shapes.sizes()
    tiles, offload, mode = memory.mlp_tiles, memory.offload_activations, memory.recompute
    attention, mlp = shapes.attention_saves(), shapes.mlp_saves()
    mlp_kept = {"x1"} if tiles > 1 else mlp  # recompute(norm_mlp, tile) keeps each tile's input: views of x1
    mlp_tile = -(-_total(shapes, mlp) // tiles) if tiles > 1 else 0
    grads = _gradient_working(shapes, tiles)
    if mode == "full":
        kept = {"x"}
        host = {"x": s["x"], "cos_sin": s["cos_sin"]} if offload else {}
        working = _total(shapes, attention | mlp_kept) + mlp_tile + grads
        return BlockMemory({} if offload else {"x": s["x"]}, host, working)
    if mode == "around_core":
        core = attention - shapes._norm_saves("attn_norm", "x") - {"qkv.input"}
        if shapes.layout.sp > 1:
            core -= {"attn.output"}
        out = "core.output" if shapes.layout.sp == 1 else "attn.output"
        kept = core | ({"x", out} if not offload else set())
        host = {"x (projection)": s["x"], "cos_sin": s["cos_sin"], "x (after core)": s["x"], out: s[out]} \
            if offload else {}
        redo_after = _total(shapes, mlp_kept | {out}) + mlp_tile
        redo_before = _total(shapes, shapes._norm_saves("attn_norm", "x") | {"qkv.input", "qkv.output"})
        return BlockMemory({n: s[n] for n in kept}, host, max(redo_after, redo_before) + grads)
    if mode == "selective":
        kept = (attention - {"core.lse"} - ({"core.output"} if shapes.layout.sp > 1 else set())) | mlp_kept
        host = {}
        if offload:
            host = shapes.core_inputs_as_passed()
            kept -= {"q.rotated", "k.rotated", "qkv.output", "core.q", "core.k", "core.v"}
        redo = s["core.output"] + s["core.lse"]
        return BlockMemory({n: s[n] for n in kept}, host, redo + mlp_tile + grads)
    kept = attention | mlp_kept
    return BlockMemory({n: s[n] for n in kept}, {}, mlp_tile + grads)


def _gradient_working(shapes: Shapes, tiles: int) -> int:
    """Gradients alive at once inside one block's backward: the MLP's (gate_up and hidden, per tile) or the
    attention's (q, k, v, the output, the core's float32 query-gradient accumulator), with the Ulysses all-to-all
    send and receive buffers."""
    s = shapes.sizes()
    mlp = (s["gate_up.output"] + s["down.input"]) // tiles
    qkv = s["core.q"] + s["core.k"] + s["core.v"]
    a2a = 2 * qkv if shapes.layout.sp > 1 else 0
    return max(mlp, qkv + s["core.output"] + s["core.dq_accum"] + a2a)
