"""PreemptionGuard: signals set a flag (the step finishes, the state is saved), handlers are restored."""

from __future__ import annotations

import os
import signal

import pytest

from dsa_train.checkpoint.preemption import PreemptionGuard


def test_sigterm_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end the test process without the guard
        assert guard.should_stop(2)
        assert guard.should_stop(3)  # stays set
        assert guard.message(2) == ("preempted at step 2: received SIGTERM; the checkpoint of step 2 is "
                                    "saved: run the same command again to resume")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_one_ctrl_c_stops_cleanly_and_a_second_one_interrupts():
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.should_stop(1) and guard.reason == "received SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_request_stop_and_multi_process_mode_uses_the_sync_point(monkeypatch):
    from jax.experimental import multihost_utils

    calls = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: calls.append(step) or step == 5)
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard(multi_process=True) as guard:
        # multi-process: JAX's notifier keeps SIGTERM, all processes agree on the step
        assert signal.getsignal(signal.SIGTERM) is before
        assert not guard.should_stop(4)
        assert guard.should_stop(5) and guard.reason == "reached the preemption sync point"
    assert calls == [4, 5]
    with PreemptionGuard() as guard:
        guard.request_stop("time budget reached")
        assert guard.should_stop(1) and "time budget reached" in guard.message(1)
