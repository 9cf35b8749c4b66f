"""StepWatchdog (attention/host.py): a step whose CPU jobs overrun gets its device-side waits
released once, and never after it ended."""

from __future__ import annotations

import time

from apex_grpc.attention.host import StepWatchdog


def test_an_overrunning_step_is_released_once_and_an_ended_one_never():
    released = []
    watchdog = StepWatchdog(released.append, timeout_s=0.2, poll_s=0.02)
    try:
        watchdog.arm(7)
        time.sleep(0.05)
        assert released == []  # not yet past its deadline
        time.sleep(0.4)
        assert released == [7]
        watchdog.arm(8)
        watchdog.disarm()  # the step ended in time
        time.sleep(0.4)
        assert released == [7]
        watchdog.arm(9)
        watchdog.fire()  # end_step found a job past the deadline: release now
        watchdog.fire()
        assert released == [7, 9]
    finally:
        watchdog.close()
