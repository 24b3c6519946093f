"""Read-only information about the current task run (Prefect's context)."""

import json as _json

from wit_world.imports import context as _wit


def get(key, default=None):
    """The value of a context key as a string, or ``default`` when it is not set.

    The built-in keys ``flow_run_id``, ``task_run_id``, ``task_name``, ``attempt``,
    ``map_index`` and ``parameters`` always come from the run itself; every other key comes from
    the flow's ``[context]`` table or ``--context key=value``.
    """
    value = _wit.get(key)
    return default if value is None else value


def flow_run_id():
    """The id of the flow run this task run belongs to."""
    return _wit.flow_run_id()


def task_run_id():
    """The id of this task run."""
    return _wit.task_run_id()


def task_name():
    """The name of the task."""
    return _wit.task_name()


def attempt():
    """The attempt number, starting at 1."""
    return _wit.attempt()


def map_index():
    """The index of this child run within a mapped task, or ``None``."""
    return _wit.map_index()


def parameters():
    """The flow run's parameters, as a ``dict``."""
    return _json.loads(_wit.parameters())
