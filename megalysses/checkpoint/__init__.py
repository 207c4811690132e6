"""Checkpoints that survive layout changes and crashes.

On disk (`checkpoint.dir`, default `<logging.run_dir>/checkpoints`):

    latest                      one line: the name of the newest committed checkpoint (written after it)
    step-12/                    one committed checkpoint
      .metadata                 torch.distributed.checkpoint (DCP) index: every tensor's key, full shape, dtype
      __<r>_<i>.distcp          DCP data files (one per writing rank; one per tensor when written offline)
      config.yaml               the resolved RunConfig (model, layout, train, ...), loadable by load_run_config
      meta.json                 format/version, step, world size and resolved layout at save time, whether AdamW
                                state is present, data position ({step, global_batch_size, loaders: {train: the
                                BatchLoader state}}), source (e.g. {format: hf, family, dtype} for converted models)
      rng/rank-00000.pt         each global rank's torch CPU (+ CUDA) generator and Python `random` state
      manifest.json             written last: {format, version, step, files: {name: {bytes, sha256}}}
    .tmp-step-14/               a save in progress (or one a crash interrupted: never resumed, removed next save)

Tensors are layout-independent: each parameter under its canonical name (`GPT.canonical_parameters()`) in its FULL
logical shape (TP shards gathered, vocab padding dropped, fused qkv / gate_up as the model holds them):

    model.<name>                fp32 master value (the weights; bf16 runs cast from it)
    optim.<name>.exp_avg        AdamW first moment, full shape, fp32
    optim.<name>.exp_avg_sq     AdamW second moment, full shape, fp32
    optim.<name>.step           AdamW step count, 0-d fp32

Every tensor is written once: by one rank of the pipeline stage that holds it (sizes balanced over its dp x ring x sp x tp
ranks), never by dp/sp replicas, never for the tied embedding's copy on the last stage. Any layout (tp, sp, pp, dp,
ZeRO 0/1/3, world size) loads it: each rank reads the full tensors of its own parameters one at a time and cuts its
shards out. A save goes to `.tmp-step-N`, is hashed (each rank its share of the files) and checked complete, then
renamed to `step-N` (os.replace), then `latest` is rewritten (temp + replace), then checkpoints beyond keep_last are
deleted. Loading re-checks sizes and SHA-256s against the manifest before it reads (or unpickles) anything; resume
'auto' falls back to the newest good one. A shared filesystem across ranks is assumed (as DCP's FileSystemWriter
does). `checkpoint.resume=never` over existing checkpoints is refused unless `checkpoint.overwrite=true`
(`check_overwrite`, before ranks start, and again at the first save).

What the manifest promises: every listed file is present, of its recorded size and SHA-256, so damage, truncation
and a half-finished save are detected. It does not authenticate: whoever can rewrite the files can rewrite the
manifest, so it detects tampering only when the manifest itself comes from a trusted place. Version-1 manifests
(CRC32) are still read, with a warning: refusing them would strand every older run's checkpoints, and CRC32 catches
damage as well; only the tampering promise is weaker. Loading never runs code from a checkpoint either way: the DCP
`.metadata` is unpickled admitting only DCP's metadata classes and torch dtypes (`unpickle.DCP_GLOBALS`), RNG and
module extra state load with torch.load(weights_only=True), and Transformer Engine's pickled FP8 state is unpickled
with an allow-list and re-pickled before TE's set_extra_state sees it.
"""
from .files import (CheckpointError, is_checkpoint, list_checkpoints, read_manifest, resolve,
                    step_dir_name, verify)
from .state import TrainingState, model_key, optimizer_key
from .tensors import TensorReader, save_streaming
from .checkpointer import Checkpointer, check_overwrite, checkpoint_root, resume_candidates
from .init_from import HFWeights, check_init_from, source_model

__all__ = ["CheckpointError", "Checkpointer", "HFWeights", "check_init_from", "source_model", "TensorReader", "TrainingState", "check_overwrite", "checkpoint_root",
           "is_checkpoint", "list_checkpoints", "model_key", "optimizer_key", "read_manifest", "resolve",
           "resume_candidates", "save_streaming", "step_dir_name", "verify"]
