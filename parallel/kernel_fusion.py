"""Token-wise elementwise chains (RoPE, SwiGLU, RMSNorm, the cross-entropy's softmax passes) fused into one kernel
each on CUDA by torch.compile; the same Python function runs eagerly on CPU, where it is the reference. (A general
kernel helper, kept in the lowest layer so that parallel/ and models/ both use it.)

Without fusion each chain is several memory-bound kernels over (tokens, width) tensors, several of them on strided
views (the q / k / v split, the gate / up halves): on one H200 they took about a quarter of a Llama-3.2-1B training
step at 8K tokens. A function that fails to compile (an unsupported torch or GPU) warns once and stays eager.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import torch
import torch.utils.checkpoint

logger = logging.getLogger("megalysses")

ENABLED = os.environ.get("MEGALYSSES_FUSED", "1") != "0"
"""MEGALYSSES_FUSED=0 turns fusion off (every chain runs eagerly, also on CUDA): for debugging and A/B timing."""


PASS_THROUGH = tuple(t for t in (torch.OutOfMemoryError,
                                 getattr(torch.utils.checkpoint, "_StopRecomputationError", None)) if t is not None)
"""Exceptions that cross a compiled chain without being compile failures: out of memory, and the early stop of a
non-reentrant checkpoint's recomputation (raised from a saved-tensor hook inside the chain once backward has every
tensor it needs, e.g. at RoPE, the last op recomputed under memory.recompute=around_core)."""


def fused(fn: Callable) -> Callable:
    """fn compiled into fused kernels when its first argument is a CUDA tensor; fn itself otherwise."""
    state = {"compiled": None, "failed": False}

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not (ENABLED and args[0].is_cuda) or state["failed"]:
            return fn(*args, **kwargs)
        if state["compiled"] is None:
            state["compiled"] = torch.compile(fn, fullgraph=True, dynamic=None)
        try:
            return state["compiled"](*args, **kwargs)
        except PASS_THROUGH:
            raise
        except Exception as err:  # compile-time failure: this chain stays eager from now on
            state["failed"] = True
            logger.warning("fused %s: torch.compile failed (%s: %s); running it eagerly", fn.__name__,
                           type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return fn(*args, **kwargs)

    call.eager = fn
    return call
