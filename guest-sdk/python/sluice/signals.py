"""Signals: raise (or return) one to set the task run's state instead of returning an output."""

import datetime as _dt
import json as _json


class Signal(Exception):
    """Base class of every signal. ``message`` is recorded on the state."""

    def __init__(self, message=""):
        super().__init__(message)
        self.message = str(message)


class Fail(Signal):
    """Fail the task run (Failed; like any failure it is retried while the task has retries left)."""


class Skip(Signal):
    """Skip the task run (Skipped, a successful state)."""


class Pause(Signal):
    """Pause the task run until it is resumed (Paused)."""


class Retry(Signal):
    """Retry the task run (AwaitingRetry), or fail when no retries remain.

    ``delay`` is how long to wait before the next attempt: seconds (``int``/``float``) or a
    ``datetime.timedelta``. Without it the task's configured ``retry_delay`` applies.
    """

    def __init__(self, message="", delay=None):
        super().__init__(message)
        if isinstance(delay, _dt.timedelta):
            delay = delay.total_seconds()
        if delay is not None:
            if delay < 0:
                raise ValueError(f"a retry delay cannot be negative: {delay}")
            delay = int(round(delay * 1000))
        self.delay_ms = delay


class Success(Signal):
    """Complete the task run with a message (Completed) and an optional output."""

    _NO_OUTPUT = object()

    def __init__(self, message="", output=_NO_OUTPUT):
        super().__init__(message)
        self.output = output

    @property
    def has_output(self):
        return self.output is not Success._NO_OUTPUT


def _to_wit(signal):
    """The WIT `signal` variant for a Python signal."""
    # `sluice:task/types`, named by the build (wasi:http has an interface `types` too).
    from wit_world.imports import sluice_types as t

    if isinstance(signal, Fail):
        return t.Signal_Fail(signal.message)
    if isinstance(signal, Skip):
        return t.Signal_Skip(signal.message)
    if isinstance(signal, Pause):
        return t.Signal_Pause(signal.message)
    if isinstance(signal, Retry):
        return t.Signal_Retry(t.RetryRequest(signal.message, signal.delay_ms))
    if isinstance(signal, Success):
        output = _json.dumps(signal.output, allow_nan=False) if signal.has_output else None
        return t.Signal_Success(t.SuccessReport(output, signal.message))
    raise TypeError(f"not a Sluice signal: {signal!r} (use Fail, Retry, Skip, Pause or Success)")
