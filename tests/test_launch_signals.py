"""Graceful stop: SIGTERM / SIGINT set a flag instead of killing the process, and every rank agrees to stop."""
import os
import signal
import threading
import time

import torch

from megalysses.parallel.launch import run_ranks
from megalysses.signals import StopRequest, stop_agreed, stop_on_signals


def send_to_self(signum, stop: StopRequest):
    """Signal this process and wait until the handler (run between bytecodes of the main thread) has seen it."""
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 5
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.001)


def test_sigterm_sets_the_flag_instead_of_ending_the_process(capfd):
    with stop_on_signals() as stop:
        assert stop.installed and not stop.requested
        send_to_self(signal.SIGTERM, stop)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert "SIGTERM received, stopping after this step" in capfd.readouterr().err


def test_sigint_does_not_raise_and_repeats_are_harmless(capfd):
    steps = 0
    with stop_on_signals() as stop:
        while not stop.requested:  # a training loop: the step in flight finishes, then the loop ends
            steps += 1
            if steps == 3:
                send_to_self(signal.SIGINT, stop)
        send_to_self(signal.SIGTERM, stop)  # torchrun forwards the terminal's Ctrl-C again: still no exception
        send_to_self(signal.SIGINT, stop)
    assert steps == 3 and stop.signal_name == "SIGINT"
    assert capfd.readouterr().err.count("received") == 1


def test_previous_handlers_come_back():
    seen = []
    before = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with stop_on_signals() as stop:
            send_to_self(signal.SIGTERM, stop)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.001)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_off_the_main_thread_nothing_is_installed():
    result = []

    def body():
        with stop_on_signals() as stop:
            result.append(stop.installed)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert result == [False] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _agree(rank, world, stopping_rank):
    stop = StopRequest()
    if rank == stopping_rank:
        stop.request(signal.SIGTERM)
    return stop_agreed(stop, torch.device("cpu"))


def test_one_rank_signalled_stops_every_rank():
    assert run_ranks(_agree, 3, 1) == [True, True, True]
    assert run_ranks(_agree, 3, None) == [False, False, False]
    assert stop_agreed(StopRequest(), torch.device("cpu")) is False  # no process group: this process alone
