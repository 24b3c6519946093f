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

Build with ``guest-sdk/python/build <task.py or directory> <out.wasm>``. The contract is
``wit/task.wit`` (world ``task``).
"""


from . import context, log
from .signals import Fail, Pause, Retry, Signal, Skip, Success

__all__ = ["Fail", "Pause", "Retry", "Signal", "Skip", "Success", "context", "log"]
