"""GPTConfig: the geometry and options of a Llama-family decoder; MemoryConfig: how its activations are kept."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union, get_args


Backend = Literal["torch", "te"]
BACKENDS = get_args(Backend)
AttentionCore = Literal["sdpa", "flash", "te", "auto", "flex", "reference"]
ATTENTION_CORES = get_args(AttentionCore)


class ModelConfigError(ValueError):
    """An inconsistent model configuration; the message names the fields and the fix."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (HF rope_type 'llama3')."""

    factor: float = 8.0
    """How much the context was extended: low frequencies are divided by this."""
    low_freq_factor: float = 1.0
    """Wavelengths above original_max_position_embeddings / low_freq_factor are fully scaled."""
    high_freq_factor: float = 4.0
    """Wavelengths below original_max_position_embeddings / high_freq_factor are left as they are."""
    original_max_position_embeddings: int = 8192
    """Context length of the model before the extension."""


@dataclass(frozen=True)
class GPTConfig:
    """A decoder-only transformer: pre-norm RMSNorm blocks, RoPE attention with GQA, SwiGLU MLP."""

    vocab_size: int = 256
    """Tokens in the vocabulary (need not divide anything: TP pads it internally and never predicts the padding)."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: Optional[int] = None
    """Key/value heads (grouped-query attention); None means num_heads (multi-head attention)."""
    head_dim: Optional[int] = None
    """Width of one head; None means hidden_size / num_heads."""
    intermediate_size: int = 172
    """Width of the SwiGLU MLP's hidden layer."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: Optional[RopeScaling] = None
    """Llama-3 RoPE scaling for extended contexts; None for plain RoPE."""
    max_seq_len: int = 2048
    """Longest sequence the model is configured for (used for checks and FLOP counts, not a hard cap on RoPE)."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head."""
    qkv_bias: bool = False
    """Bias on the q, k, v projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head (weights of head_dim) before RoPE (Qwen3)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    attention_core: AttentionCore = "sdpa"
    """Local attention kernel inside the Ulysses head-sharded region: 'sdpa' (torch SDPA: cuDNN / flash / math
    kernels), 'flash' (flash-attn), 'te' (Transformer Engine fused attention), 'auto' (fastest installed).
    Under layout.ring it picks the ring's block core (a core that returns its log-sum-exp): 'auto' is flash-attn-4
    when it imports on a Hopper-class GPU, else FlexAttention on CUDA and the fp32 reference on CPU; 'sdpa' (SDPA
    returns no log-sum-exp) is FlexAttention on CUDA and the reference on CPU; 'flash' is flash-attn-4 (packed-document
    blocks through FlexAttention); 'flex' and 'reference' name those cores (ring only); 'te' is refused."""
    softmax_scale: Optional[float] = None
    """Scale of q.k inside softmax; None means 1 / sqrt(head_dim). Every attention core uses it."""
    backend: Backend = "torch"
    """Layer backend: 'torch' (our layers, CPU and GPU) or 'te' (Transformer Engine linear / norm layers, CUDA)."""

    def __post_init__(self):
        for name, choices in (("backend", BACKENDS), ("attention_core", ATTENTION_CORES)):
            if getattr(self, name) not in choices:
                raise ModelConfigError(f"model.{name} = {getattr(self, name)!r}: choose one of {', '.join(choices)}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ModelConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}: "
                    "set head_dim explicitly or choose divisible sizes")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"model.{name} = {getattr(self, name)}: must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}: each kv head "
                "serves a whole group of query heads")
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count (embedding and head counted once if tied)."""
        d, f = self.hidden_size, self.intermediate_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d + (self.q_size + 2 * self.kv_size) * self.qkv_bias
        block = attn + 3 * d * f + 2 * d + 2 * self.head_dim * self.qk_norm
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * block + emb + d


Recompute = Literal["none", "selective", "around_core", "full", "auto"]
RECOMPUTE = get_args(Recompute)
AUTO = "auto"
"""A memory key left to the planner (megalysses.plan): the fastest setting predicted to fit, chosen at start."""


@dataclass(frozen=True)
class MemoryConfig:
    """Activation-memory savers for long sequences; each one leaves the loss and every gradient unchanged. Any key may
    be 'auto': the planner picks, before the ranks start, the fastest combination predicted to fit (and logs why)."""

    recompute: Recompute = "none"
    """Activation checkpointing: 'full' keeps only each block's input and recomputes the block in backward;
    'selective' recomputes only the attention core, inside the Ulysses head-sharded region, so the all-to-alls are
    not re-run (it saves the core's output and softmax statistics, and the (s, s) scores where a core materialises
    them); 'around_core' recomputes everything in the block except the attention core, whose inputs and output are
    kept, and no all-to-all re-runs (with a flash-style core the cheapest recompute at long sequences, where the
    core dominates the FLOPs); 'none' keeps everything; 'auto' lets the planner choose. With a ring degree the core
    is ring attention, which keeps only q, k, v, its output and log-sum-exp: 'selective' then frees just the output
    and log-sum-exp and re-runs the ring's k/v passes in backward ('full' re-runs them too), while 'around_core' keeps
    the core's inputs and output and re-runs no ring pass: the one worth taking there."""
    offload_activations: Union[bool, Literal["auto"]] = False
    """Move the inputs of every recomputed region (each block's input under 'full', the head-sharded q, k, v under
    'selective', the block's input and the attention output under 'around_core') to pinned host memory until
    backward needs them; needs recompute != 'none'; 'auto' lets the planner choose."""
    mlp_tiles: Union[int, Literal["auto"]] = 1
    """Run the pre-MLP norm and the SwiGLU MLP over this many sequence tiles, each recomputed in backward, so only one
    tile's (tile, intermediate_size / tp) activations exist at once; 1 = off; 'auto' lets the planner choose."""
    loss_tiles: Union[int, Literal["auto"]] = 1
    """Compute the LM-head logits and the vocab-parallel cross-entropy over this many sequence tiles, each recomputed
    in backward, so the (s, vocab / tp) logits never exist at once; 1 = off; 'auto' lets the planner choose. Applies
    when labels are given. With fused_loss, the number of token chunks of the fused head + loss instead (nothing is
    recomputed)."""
    fused_loss: Union[bool, Literal["auto"]] = False
    """Fuse the LM head and the vocab-parallel cross-entropy (Liger's fused linear cross-entropy over vocab shards):
    token chunks whose logits, loss and gradients (hidden states and head weight) are formed in one pass in forward,
    so neither the whole (tokens, vocab / tp) logits nor a backward recompute exist. Chunks: loss_tiles when > 1, else
    as many as keep a chunk's logits under 2^28 elements. Applies to the trainer's loss (the model given the step's
    valid-token count); the same loss and gradients as the unfused head up to float rounding. 'auto' lets the
    planner choose."""

    offload_layers: int = 0
    """With offload_activations: offload only the layers whose global index is below this (the first layers, whose
    inputs wait longest for backward), keeping the rest on the device, when the host cannot take every layer's
    inputs next to the rest of what it holds (an offloaded optimizer state, say); 0 = every layer."""

    def __post_init__(self):
        if self.recompute not in RECOMPUTE:
            raise ModelConfigError(f"memory.recompute = {self.recompute!r}: choose one of {', '.join(RECOMPUTE)}")
        for name in ("offload_activations", "fused_loss"):
            if getattr(self, name) not in (True, False, AUTO):
                raise ModelConfigError(f"memory.{name} = {getattr(self, name)!r}: true, false or 'auto'")
        for name in ("mlp_tiles", "loss_tiles"):
            value = getattr(self, name)
            if value != AUTO and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ModelConfigError(f"memory.{name} = {value!r}: must be >= 1 (1 turns tiling off) or 'auto'")
        if not isinstance(self.offload_layers, int) or isinstance(self.offload_layers, bool) or self.offload_layers < 0:
            raise ModelConfigError(f"memory.offload_layers = {self.offload_layers!r}: must be >= 0 (0 offloads every "
                                   "layer)")
        if self.offload_layers and self.offload_activations is False:
            raise ModelConfigError(f"memory.offload_layers = {self.offload_layers} limits which layers offload, and "
                                   "memory.offload_activations = false offloads none: set "
                                   "memory.offload_activations=true, or memory.offload_layers=0")
        if self.offload_activations is True and self.recompute == "none":
            raise ModelConfigError("memory.offload_activations = true offloads the inputs of recomputed regions, and "
                                   "memory.recompute = 'none' recomputes nothing: set memory.recompute to 'full', "
                                   "'around_core' or 'selective'")

    def auto_keys(self) -> tuple[str, ...]:
        """The keys left to the planner."""
        return tuple(k for k in ("recompute", "offload_activations", "mlp_tiles", "loss_tiles", "fused_loss")
                     if getattr(self, k) == AUTO)

    def offloads_layer(self, layer: int) -> bool:
        """Whether the block of this global layer index keeps its recomputed regions' inputs on the host."""
        return self.offload_activations is True and (self.offload_layers == 0 or layer < self.offload_layers)

    def require_resolved(self) -> None:
        """Raise where a key is still 'auto' (the model needs concrete savers: megalysses.plan resolves them)."""
        if self.auto_keys():
            keys = ", memory.".join(self.auto_keys())
            raise ModelConfigError(f"memory.{keys} = 'auto' reached the model unresolved: "
                                   "resolve it with megalysses.plan.resolve_auto(cfg, world) (the trainer does) or set "
                                   "concrete values")
