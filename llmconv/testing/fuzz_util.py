"""What the fuzz tests share: a wall-clock limit on one input, raised as Hang."""

from __future__ import annotations

import contextlib
import signal


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise Hang if the body runs longer than `seconds`. The alarm's exception can land where
    it is swallowed (a gc callback of hypothesis's prints "Exception ignored" and goes on), so
    an expired limit is also raised when the body ends, however it ends."""
    expired = []

    def on_alarm(signum, frame):
        expired.append(True)
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Hang:
        raise
    except BaseException:
        if expired:
            raise Hang(f"no result after {seconds} s") from None
        raise
    else:
        if expired:
            raise Hang(f"no result after {seconds} s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
