"""megalysses-train: train a model from a run config (the Trainer in megalysses/trainer.py does the work).

    megalysses-train                                  # CPU quick-start: tiny model, 4 gloo ranks (tp2 x sp2)
    megalysses-train --config run.yaml train.lr=1e-4 layout=sp4
    torchrun --nproc-per-node 4 -m megalysses.train --config run.yaml   # GPUs (NCCL) or CPU (gloo)
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megalysses.parallel.launch import add_debug_flag, apply_debug_flag, launch, launch_world_size

from .checkpoint import check_init_from, check_overwrite
from .config import CONFIG_DIR, ConfigError, RunConfig, load_run_config
from .data import check_data_against_model
from .trainer import check_machine
from .sinks import require_sinks
from .trainer import train, with_seq_len

QUICKSTART = CONFIG_DIR / "runs" / "quickstart.yaml"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megalysses-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(QUICKSTART), help="run YAML (default: the bundled CPU quick-start)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 layout=sp4")
    add_debug_flag(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    apply_debug_flag(args)
    return args


def load_checked(prog: str, config: str, overrides: Sequence[str], data: bool = True,
                 seq_lens: Sequence[int] = ()) -> Optional[RunConfig]:
    """The run config, checked before any rank starts (against the world it will run on, at each of seq_lens too,
    this machine's devices, and with `data` the dataset's vocabulary and tokenizer and the checkpoints it would
    overwrite); None (after one line on stderr) when it is wrong."""
    try:
        cfg = load_run_config(config, overrides)
        for seq_len in seq_lens or [cfg.train.seq_len]:
            with_seq_len(cfg, seq_len).check(launch_world_size(cfg.train.nproc))
        require_sinks(cfg.logging)  # a missing wandb / tensorboard package stops here
        check_machine(cfg)
        if data:
            check_data_against_model(cfg)
            check_overwrite(cfg)
            check_init_from(cfg)
        return cfg
    except (ConfigError, FileNotFoundError) as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_checked("megalysses-train", args.config, args.overrides)
    if cfg is None:
        return 2
    return launch(train, cfg, nproc=cfg.train.nproc, device_type=cfg.train.device, command="megalysses.train")


if __name__ == "__main__":
    sys.exit(main())
