"""Flows written as code: a flow body submits the tasks its flow declares and decides what to do
from their states and results, one construct per row of Prefect 2's types of submission::

    from sluice import flow

    def run(parameters):
        r1 = flow.call("t1", 1)                  # r1 = t1()
        f1 = flow.submit("t1", 2)                # f1 = t1.submit()
        s1 = f1.wait()                           # Completed/Failed
        s2 = flow.submit("t2", 3).get_state()    # Pending/Running, without waiting
        r2 = f1.result()                         # raises TaskRunFailed on failure
        s3 = f1.result(raise_on_failure=False)   # the output, or the failed State
        futures = flow.map_("add_one", [1, 2, 3])
        states = flow.map_("add_one", [1, 2, 3], return_state=True)
        report = flow.subflow("report", {"day": 3}).result()   # a child flow run
        return r1

A flow body is the module ``flow.py`` (or a directory with ``flow.py``) defining
``run(parameters)``; ``guest-sdk/python/build`` builds it against world ``flow`` of
``wit/task.wit``. It must be deterministic: it is replayed from the start when its run is
resumed. Its clocks and random numbers are the run's (the same on every replay), and
:func:`now` is the time as the run recorded it. Nothing is granted to it: no files, network or
environment.
"""

import json

from componentize_py_types import Err
from wit_world.imports import orchestrate as _o

__all__ = [
    "Future",
    "FutureReleased",
    "State",
    "SubmissionRefused",
    "TaskRunFailed",
    "call",
    "map_",
    "now",
    "subflow",
    "submit",
    "wait_all",
    "wait_any",
]

class State:
    """A task run's state: ``name`` (``Completed``, ``Failed``, ``TimedOut``, …), ``type``
    (``COMPLETED``, ``FAILED``, …), ``message``, and :meth:`result`."""

    def __init__(self, wit_state):
        self.name = wit_state.name
        self.type = wit_state.type.name
        self.message = wit_state.message
        self._result = None if wit_state.result is None else json.loads(wit_state.result)

    def result(self, raise_on_failure=True):
        """The output of a successful state (Prefect's ``State.result()``); for another state,
        raise :class:`TaskRunFailed` (``raise_on_failure=False``: return the state)."""
        if self.is_completed():
            return self._result
        if raise_on_failure:
            raise TaskRunFailed(self)
        return self

    def is_completed(self):
        """Whether it is a successful final state (Completed, Cached, Skipped, …)."""
        return self.type == "COMPLETED"

    def is_failed(self):
        """Whether it is a Failed-type state (Failed, TimedOut, TriggerFailed, …)."""
        return self.type == "FAILED"

    def is_final(self):
        """Whether nothing more happens to the task run."""
        return self.type in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

    def __repr__(self):
        return f"State({self.name!r}, message={self.message!r})"


class SubmissionRefused(Exception):
    """The host refused a submission (an undeclared task, the run's task limit, …)."""


class TaskRunFailed(Exception):
    """A task run ended in a state that is not successful; ``state`` is that state."""

    def __init__(self, state):
        super().__init__(
            f"the task run ended {state.name}" + (f": {state.message}" if state.message else "")
        )
        self.state = state


class FutureReleased(Exception):
    """A future used after it was released (its ``with`` block ended): its task run's state and
    result can no longer be read."""


class Future:
    """A submitted task run (Prefect's ``PrefectFuture``). When it is garbage collected (or
    leaves a ``with`` block) the host is told the body will not read its result again; using it
    after its ``with`` block raises :class:`FutureReleased`."""

    def __init__(self, handle):
        self._handle = handle
        self._released_id = None

    def _live(self):
        if self._handle is None:
            raise FutureReleased(
                f"the future of task run {self._released_id} was released (its `with` block "
                "ended): its state and result can no longer be read"
            )
        return self._handle

    @property
    def id(self):
        """The task run's id."""
        return self._released_id if self._handle is None else self._handle.id()

    def wait(self):
        """Block until the task run is final and return its :class:`State`."""
        return State(self._live().wait())

    def get_state(self):
        """The task run's :class:`State` now, without waiting (Pending, Running or final)."""
        return State(self._live().get_state())

    def result(self, raise_on_failure=True):
        """Block until the task run is final: its output; on a state that is not successful,
        raise :class:`TaskRunFailed` (``raise_on_failure=False``: return that state)."""
        handle = self._live()
        try:
            return json.loads(handle.result())
        except Err as e:
            state = State(e.value)
            if raise_on_failure:
                raise TaskRunFailed(state) from None
            return state

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            handle, self._released_id = self._handle, self._handle.id()
            self._handle = None
            handle.__exit__(*exc)
        return None


def _json(value):
    return json.dumps(value, allow_nan=False)


def submit(task, input=None, wait_for=(), trigger=None, return_state=False):
    """Submit one task run of the declared task ``task`` (Prefect's ``t.submit(x)``): its
    :class:`Future`; ``return_state=True``: wait and return its final :class:`State`. It starts
    once every future in ``wait_for`` is final, their states feeding its trigger (``trigger``,
    e.g. ``"all_finished"``, or the task's own)."""
    try:
        f = Future(_o.submit(task, _json(input), [f._live() for f in wait_for], trigger))
    except Err as e:
        raise SubmissionRefused(e.value) from None
    return f.wait() if return_state else f


def map_(task, inputs, wait_for=(), return_state=False):
    """Submit one task run of ``task`` per input, as one mapped task run (Prefect's
    ``t.map(inputs)``): the futures; ``return_state=True``: wait and return their states."""
    try:
        handles = _o.submit_map(task, [_json(i) for i in inputs], [f._live() for f in wait_for])
    except Err as e:
        raise SubmissionRefused(e.value) from None
    futures = [Future(h) for h in handles]
    if return_state:
        return [f.wait() for f in futures]
    return futures


def call(task, input=None):
    """Submit ``task`` and return its output (Prefect's ``r = t(x)``); raises
    :class:`TaskRunFailed` when it fails."""
    return submit(task, input).result()


def subflow(flow, parameters=None):
    """Run the subflow ``flow`` (a manifest's ``[subflows]``) as a child flow run with
    ``parameters`` (a dict, over the subflow's defaults): the :class:`Future` of the task run
    standing for it, final when the child is, the child's result its output (Prefect's calling
    a flow from a flow)."""
    try:
        return Future(_o.subflow(flow, _json(parameters if parameters is not None else {})))
    except Err as e:
        raise SubmissionRefused(e.value) from None


def wait_all(futures):
    """Block until every one of ``futures`` is final."""
    _o.wait_all([f._live() for f in futures])


def wait_any(futures):
    """Block until one of ``futures`` is final; return its index (the lowest of those final)."""
    if not futures:
        raise ValueError("wait_any of no futures would wait for ever")
    return _o.wait_any([f._live() for f in futures])


def now():
    """The time as the run recorded it (RFC 3339; the same when the body is replayed)."""
    return _o.now()
