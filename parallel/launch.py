"""Start ranks: `launch` for the command-line tools (under torchrun: this process is one rank; otherwise N local CPU
ranks), and `run_ranks` (gloo, forkserver processes, file store) for tests and the CPU quick-start."""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

# Modules the forkserver imports once, so each rank starts in well under a second instead of re-importing torch.
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "torch.distributed.tensor",
           "torch.distributed.checkpoint", "megalysses.parallel.mesh"]


RANK_DIR_PREFIX = "megalysses-ranks-"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
ORPHAN_GRACE_S = 600.0
"""How long a rank whose launcher died may take to finish its step and save before it exits regardless."""


class RankFailure(RuntimeError):
    """A rank raised, or the ranks did not finish before the deadline; the message holds their tracebacks, `summary`
    one line (the failing rank and its exception)."""

    def __init__(self, message: str, summary: Optional[str] = None):
        super().__init__(message)
        self.summary = summary or message.splitlines()[0]


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD + [m for m in os.environ.get("MEGALYSSES_PRELOAD", "").split(",") if m])
    return ctx


def _rank_main(fn, rank: int, world: int, store_path: str, dump_dir: str, timeout: float, results, launcher: int,
               forward_signals: bool, args, kwargs):
    """Body of one rank: set threads, arm the hang dump, join the process group, run fn, report."""
    import torch
    import torch.distributed as dist

    if forward_signals:  # a terminal's Ctrl-C reaches the launcher too, which sends every rank SIGTERM
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_launcher(launcher, dump_dir)
    torch.set_num_threads(1)
    dump = open(Path(dump_dir) / f"rank{rank}.stacks", "w")
    faulthandler.dump_traceback_later(max(timeout - 2.0, 1.0), exit=False, file=dump)
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout + 30))
        value = fn(rank, world, *args, **kwargs)
        # pickled here, in band: tensors sent through the queue as-is would point at shared memory that
        # vanishes when this process exits before the parent reads them
        results.put(("ok", rank, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its traceback
        results.put(("error", rank, traceback.format_exc()))
    finally:
        faulthandler.cancel_dump_traceback_later()
        if not _alive(launcher):  # nobody is left to clean up the scratch folder
            shutil.rmtree(dump_dir, ignore_errors=True)
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher) started this process as one rank of a job."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch_world_size(nproc: int) -> int:
    """The number of ranks `launch` will run on: torchrun's world size, else nproc local CPU ranks."""
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else nproc


def launch(fn: Callable[..., Any], *args, nproc: int, device_type: str, command: str) -> int:
    """fn(*args) on every rank; returns the exit code. Under torchrun this process is one rank (NCCL on CUDA, gloo
    on CPU); otherwise `nproc` gloo CPU ranks start here (fn module-level, picklable). `command` names the tool in
    messages (e.g. 'megalysses.train')."""
    if under_torchrun():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        import torch.distributed as dist

        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - one line per failing rank; the traceback on request
            if debugging():
                raise
            print(f"{command}: rank {dist.get_rank()} failed: {type(e).__name__}: {e} (pass --debug for "
                  "the traceback)", file=sys.stderr, flush=True)
            return 1
        finally:
            dist.destroy_process_group()
        return 0
    if device_type == "cuda":
        print(f"{command}: device cuda needs one process per GPU: start it with "
              f"torchrun --nproc-per-node N -m {command} ...", file=sys.stderr)
        return 2
    try:
        run_ranks(_without_rank, nproc, fn, *args, timeout=7 * 24 * 3600.0, forward_signals=True)
    except RankFailure as e:
        print(f"{command}: {e if debugging() else e.summary + ' (pass --debug for the traceback)'}",
              file=sys.stderr, flush=True)
        return 1
    return 0


def debugging() -> bool:
    """MEGALYSSES_DEBUG=1 (the CLIs' --debug): rank failures print their whole traceback instead of one line."""
    return os.environ.get("MEGALYSSES_DEBUG", "") not in ("", "0")


def add_debug_flag(parser) -> None:
    """The --debug option of a command-line tool: read it with apply_debug_flag(args)."""
    parser.add_argument("--debug", action="store_true", help="a failing rank prints its whole traceback "
                                                              "(as MEGALYSSES_DEBUG=1) instead of one line")


def apply_debug_flag(args) -> None:
    """Turn --debug into MEGALYSSES_DEBUG=1, which the launcher and every rank it starts read."""
    if getattr(args, "debug", False):
        os.environ["MEGALYSSES_DEBUG"] = "1"


def _without_rank(rank: int, world: int, fn: Callable[..., Any], *args) -> Any:
    return fn(*args)  # a launched function reads its rank from torch.distributed, as under torchrun


def run_ranks(fn: Callable[..., Any], world: int, *args, timeout: float = 120.0, forward_signals: bool = False,
              **kwargs) -> list[Any]:
    """Run fn(rank, world, *args, **kwargs) on `world` gloo ranks; returns the per-rank results in rank order.

    A raising rank fails the call at once with its traceback; ranks still running after `timeout` seconds are
    killed and the call fails with every rank's stack (a deadlock never hangs the caller). fn must be picklable
    (a module-level function). With forward_signals, SIGINT / SIGTERM to this process are passed to every rank as
    SIGTERM (the training loop then finishes its step, saves and exits) instead of ending this process. Ranks
    whose launcher dies stop the same way, and exit after ORPHAN_GRACE_S at the latest.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by the forkserver when it starts; 1 thread per rank
    ctx = _context()
    remove_orphaned_rank_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{RANK_DIR_PREFIX}{os.getpid()}-") as tmp:
        results = ctx.Queue()
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(fn, r, world, os.path.join(tmp, "store"), tmp, timeout, results, os.getpid(),
                                   forward_signals, args, kwargs))
                 for r in range(world)]
        for p in procs:
            p.start()
        try:
            with _forwarding_stop_signals(procs) if forward_signals else contextlib.nullcontext():
                return _collect(procs, results, world, timeout, tmp)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)


def _collect(procs, results, world: int, timeout: float, tmp: str) -> list[Any]:
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(values) < world:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            time.sleep(2.5)  # let the ranks' own hang dumps land
            stacks = "\n".join(f"--- rank {r} ---\n{_read(Path(tmp) / f'rank{r}.stacks')}"
                               for r in range(world) if r not in values)
            raise RankFailure(f"ranks {sorted(set(range(world)) - set(values))} did not finish within {timeout:.0f} s "
                              f"(deadlock?). Their stacks:\n{stacks}")
        try:
            status, rank, value = results.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            dead = [i for i, p in enumerate(procs) if i not in values and not p.is_alive() and p.exitcode not in (0, None)]
            if dead:
                code = procs[dead[0]].exitcode
                why = (" (a stop signal before training began: nothing to save)" if code == -signal.SIGTERM
                       else "")
                raise RankFailure(f"rank {dead[0]} died with exit code {code} before reporting{why}")
            continue
        if status == "error":
            last = value.strip().splitlines()[-1] if value.strip() else "an error"
            raise RankFailure(f"rank {rank} of {world} raised:\n{value}", f"rank {rank} of {world} failed: {last}")
        values[rank] = pickle.loads(value)
    return [values[r] for r in range(world)]


@contextlib.contextmanager
def _forwarding_stop_signals(procs) -> Iterator[None]:
    """While the ranks run, SIGINT / SIGTERM here are sent on to every live rank as SIGTERM (off the main thread,
    where handlers cannot be installed, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    told = []

    def forward(signum, frame):
        if not told:
            told.append(signum)
            os.write(2, f"megalysses: {signal.Signals(signum).name} received: the ranks finish their step, save a "
                        "checkpoint and exit\n".encode())
        for p in procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch_launcher(launcher: int, scratch: str) -> None:
    """A rank whose launcher died (killed, crashed) must not train on as an orphan: it asks itself to stop (the loop
    saves after its step), removes the launcher's scratch folder, and exits after ORPHAN_GRACE_S regardless."""
    def watch():
        while _alive(launcher):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while time.monotonic() < deadline:
            time.sleep(1.0)
        shutil.rmtree(scratch, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, name="megalysses-launcher-watch", daemon=True).start()


def remove_orphaned_rank_dirs() -> None:
    """Delete scratch folders of earlier launches whose launcher process no longer exists."""
    for path in Path(tempfile.gettempdir()).glob(f"{RANK_DIR_PREFIX}*"):
        pid = path.name[len(RANK_DIR_PREFIX):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text() or "(no dump)"
    except OSError:
        return "(no dump)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit("megalysses.parallel.launch is a library: call run_ranks(fn, world)")
