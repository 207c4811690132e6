"""megalysses-train: train a model from a run config (the Trainer in megalysses/trainer.py does the work).

    megalysses-train                                  # CPU quick-start: tiny model, 4 gloo ranks (tp2 x sp2)
    megalysses-train --config run.yaml train.lr=1e-4 layout=sp4
    torchrun --nproc-per-node 4 -m megalysses.train --config run.yaml   # GPUs (NCCL) or CPU (gloo)
    megalysses-train --config run.yaml --dry-run      # predicted memory per rank, tokens/s and MFU; no training

A run config has the sections model, layout, memory, train, data, checkpoint and logging; every key, its value and
its meaning: `megalysses-train --config run.yaml --print-config`. Before any rank starts, the planner
(megalysses.plan, also `megalysses-plan`) resolves memory keys set to 'auto' to the fastest choice predicted to fit
this machine, and refuses a run predicted not to fit, with the breakdown and the nearest setting that fits.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megalysses.parallel.launch import add_debug_flag, apply_debug_flag, launch, launch_world_size

from .checkpoint import check_init_from, check_overwrite
from megalysses.plan.run import prepare_run

from .config import CONFIG_DIR, ConfigError, RunConfig, load_run_config
from .typed_config import describe_keys, field_docs
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
    add_plan_flags(parser)
    parser.add_argument("--print-config", action="store_true",
                        help="print every key of the resolved config with its value and its docstring, and exit")
    add_debug_flag(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    apply_debug_flag(args)
    return args


def add_plan_flags(parser: argparse.ArgumentParser) -> None:
    """--dry-run and --skip-memory-check, shared by the train and bench CLIs."""
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, one rank's predicted memory against this machine's capacity "
                             "and the predicted tokens/s and MFU (megalysses-plan), and exit without training")
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="start even when the planner predicts the run does not fit (memory 'auto' is still "
                             "resolved)")


def load_checked(prog: str, config: str, overrides: Sequence[str], data: bool = True,
                 seq_lens: Sequence[int] = (), check_memory: bool = True) -> Optional[RunConfig]:
    """The run config, checked before any rank starts (against the world it will run on, at each of seq_lens too,
    this machine's devices and memory (memory 'auto' resolved by the planner), and with `data` the dataset's
    vocabulary and tokenizer and the checkpoints it would overwrite); None (after the reason on stderr) when it is
    wrong."""
    try:
        cfg = load_run_config(config, overrides)
        world = launch_world_size(cfg.train.nproc)
        for seq_len in seq_lens or [cfg.train.seq_len]:
            with_seq_len(cfg, seq_len).check(world)
        require_sinks(cfg.logging)  # a missing wandb / tensorboard package stops here
        check_machine(cfg)
        cfg, why = prepare_run(cfg, world, seq_lens, check=check_memory)
        if why and os.environ.get("RANK", "0") == "0":
            print(f"{prog}: {why}", flush=True)
        if data:
            check_data_against_model(cfg)
            check_overwrite(cfg)
            check_init_from(cfg)
        return cfg
    except (ConfigError, FileNotFoundError) as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return None


def print_config(cfg: RunConfig) -> None:
    """Every key of the config, section by section: key = value, then its docstring."""
    section = None
    for key, value, doc in describe_keys(cfg):
        top = key.split(".")[0]
        if top != section:
            section = top
            print(f"\n[{top}] {field_docs(RunConfig).get(top, '')}")
        print(f"{key} = {value!r}\n    {doc}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        try:
            print_config(load_run_config(args.config, args.overrides))
            return 0
        except ConfigError as err:
            print(f"megalysses-train: config error: {err}", file=sys.stderr)
            return 2
    cfg = load_checked("megalysses-train", args.config, args.overrides, data=not args.dry_run,
                       check_memory=not (args.skip_memory_check or args.dry_run))
    if cfg is None:
        return 2
    if args.dry_run:
        from megalysses.plan.capacity import capacity_for_run
        from megalysses.plan.cli import report

        world = launch_world_size(cfg.train.nproc)
        print(report(cfg, world, capacity_for_run(cfg, world)))
        return 0
    return launch(train, cfg, nproc=cfg.train.nproc, device_type=cfg.train.device, command="megalysses.train")


if __name__ == "__main__":
    sys.exit(main())
