"""Data parallelism over dp x ring x sp behind one interface (DataParallel): bucketed overlapped gradient reduction, ZeRO-1
distributed optimizer with fp32 master weights, FSDP2 full sharding; and the global gradient norm."""

from .buffers import Bucket, GradBuffer, Segment
from .data_parallel import BucketedDataParallel, DataParallel, FullyShardedDataParallel, ParamState
from .fsdp import FSDPGradSync, data_parallel_mesh, fully_shard_model
from .grads import all_reduce_gradients, clip_gradients, global_grad_norm, global_norm, sum_of_squares
from .sync import GradSync
from .zero import DistributedOptimizer, optimizer_state_bytes

__all__ = ["Bucket", "BucketedDataParallel", "DataParallel", "DistributedOptimizer", "FullyShardedDataParallel",
           "ParamState", "FSDPGradSync", "GradBuffer", "GradSync", "Segment",
           "all_reduce_gradients", "clip_gradients", "data_parallel_mesh", "fully_shard_model", "global_grad_norm",
           "global_norm", "optimizer_state_bytes", "sum_of_squares"]
