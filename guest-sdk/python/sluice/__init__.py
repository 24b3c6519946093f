"""Sluice's Python guest SDK: write a task as a plain function.

A task module defines ``run(input)``. The input arrives as the JSON value (``dict``, ``list``,
``str``, ``int``, ``float``, ``bool`` or ``None``) and the return value becomes the task's output
(anything ``json.dumps`` accepts)::

    import sluice
    from sluice import context, log

    def run(x):
        log.info(f"attempt {context.attempt()}")
        if x < 0:
            raise sluice.Retry(f"{x} is negative")
        return x

Raise (or return) a signal to set the state: ``Fail``, ``Retry`` (optional ``delay`` in
seconds), ``Skip``, ``Pause``, ``Success`` (a message and an optional output). Any other
exception fails the run like a Rust panic (its traceback goes to stderr, which the run's record
keeps), and stays retriable under the task's retry policy.

What the manifest grants the task (``[tasks.NAME.grants]``) it reaches with Python's own idioms:
files under the granted directories with ``open()`` and ``os``; variables and secrets with
:func:`env` and :func:`secret` (or ``os.environ``); HTTP with :mod:`sluice.http`; TCP with
``socket``. Nothing else is reachable: without a grant, ``open()`` fails, the environment is
empty and a request raises ``http.HTTPError`` (``HttpRequestDenied``).

The build runs the task's imports once and snapshots the result, so import every module at the
top of the task (a module first imported inside ``run`` may be missing), and do no I/O at import
time: nothing is granted while the component is built.

Build with ``guest-sdk/python/build <task.py or directory> <out.wasm>``. The contract is
``wit/task.wit`` (world ``task-http`` of ``wit/guests.wit``).
"""

import encodings.idna  # noqa: F401  (`socket` imports it on first use: load it at build time)
import os as _os

from . import context, log
from .signals import Fail, Pause, Retry, Signal, Skip, Success

try:
    from . import http
except ImportError as _missing:
    # A flow body (world `flow`) has no HTTP: `sluice.http` is for tasks only.
    if "outgoing_handler" not in str(_missing):
        raise
    http = None

__all__ = [
    "Fail",
    "Pause",
    "Retry",
    "Signal",
    "Skip",
    "Success",
    "context",
    "env",
    "http",
    "log",
    "secret",
]


def env(name, default=None):
    """The variable ``name`` when the task is granted it (``env = { NAME = "..." }``), else
    ``default``."""
    return _os.environ.get(name, default)


def secret(name, default=None):
    """The secret ``name`` when the task is granted it (``secrets = ["NAME"]``), else ``default``.
    The host replaces its value with ``***`` wherever it shows up in the run's logs, output or
    messages."""
    return _os.environ.get(name, default)
