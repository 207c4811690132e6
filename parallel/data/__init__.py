"""Data parallelism over dp x sp: gradient synchronisation (optimizer sharding comes here too)."""

from .grads import all_reduce_gradients, clip_gradients, global_grad_norm

__all__ = ["all_reduce_gradients", "clip_gradients", "global_grad_norm"]
