"""The component's export: turns a task function into the ``run`` of world ``task``.

The build generates the app module ``sluice_app`` that calls :func:`world` with the task's
``run`` function; componentize-py exports its ``WitWorld`` class.
"""

import json

from componentize_py_types import Err

from .signals import Signal, _to_wit


def world(run):
    """A ``WitWorld`` class whose ``run`` export calls ``run`` with the decoded input."""
    if not callable(run):
        raise TypeError(f"the task's `run` is not a function: {run!r}")

    class WitWorld:
        def run(self, input: str) -> str:
            try:
                value = json.loads(input)
            except ValueError as e:  # the host only sends valid JSON; be explicit anyway
                raise Err(_to_wit_fail(f"the task's input is not JSON: {e}"))
            try:
                result = run(value)
            except Signal as signal:
                raise Err(_to_wit(signal))
            if isinstance(result, Signal):
                raise Err(_to_wit(result))
            try:
                return json.dumps(result, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise Err(_to_wit_fail(f"the task's output is not JSON-serializable: {e}"))

    return WitWorld


def _to_wit_fail(message):
    from .signals import Fail

    return _to_wit(Fail(message))
