"""A flow body that uses every type of submission of seed 004 and returns what it observed (as
tests/guests/flow_body does in Rust, with the same keys). Parameter ``scenario``: ``types``, or
``state`` (``get_state`` of a task run of ``slow`` right after submitting it, then waited for),
``subflow``: Rust's (subflows `child` and `dag`, and the refusals), ``released``: a future waited on after its ``with`` block (the error it raises), or
``durable``: Rust's with its first submission changed (``double`` before ``slow``), the body
a resumed run of Rust's would find not deterministic."""

import random
import time

from sluice import flow
from sluice.flow import SubmissionRefused, TaskRunFailed


def run(parameters):
    if parameters.get("scenario") == "durable":
        doubled = flow.submit("double", 1)
        slow = flow.submit("slow", {"do": "sleep", "ms": parameters.get("ms")}, wait_for=[doubled])
        return {"x": doubled.result(), "slow": slow.wait().name}
    if parameters.get("scenario") == "released":
        with flow.submit("double", 1) as f:
            first = f.result()
        try:
            f.wait()
            return "unexpected: no exception"
        except flow.FutureReleased as e:
            return {"first": first, "error": str(e), "id": f.id}
    if parameters.get("scenario") == "subflow":
        child = flow.subflow("child", {"n": parameters.get("n")})
        state = child.wait()
        result = child.result()
        try:
            flow.subflow("dag").result()
            failed = "unexpected: no exception"
        except TaskRunFailed as e:
            failed = {"name": e.state.name, "message": e.state.message}
        refused = []
        for name, params in [("nope", {}), ("child", 5), ("double", {})]:
            try:
                flow.subflow(name, params)
                refused.append("unexpected: accepted")
            except SubmissionRefused as e:
                refused.append(str(e))
        try:
            flow.submit("child", 1)
            as_task = "unexpected: accepted"
        except SubmissionRefused as e:
            as_task = str(e)
        return {"state": state.name, "result": result, "failed": failed, "refused": refused,
                "as_task": as_task}
    if parameters.get("scenario") == "state":
        slow = flow.submit("slow", {"do": "sleep", "ms": parameters.get("ms")})
        before = slow.get_state().name
        return {"before": before, "after": slow.wait().name}
    if parameters.get("scenario") != "types":
        raise ValueError(f"unknown scenario {parameters.get('scenario')!r}")
    # r1 = t1(): call and get the result.
    called = flow.call("double", 2)
    # f1 = t1.submit(); its state without waiting, then waited for, then its result.
    f = flow.submit("double", 5)
    before = f.get_state()
    waited = f.wait()
    result = f.result()
    # A failing task: result() raises, unless asked not to.
    failing = flow.submit("fail", 1)
    try:
        failing.result()
        raised = "unexpected: no exception"
    except TaskRunFailed as e:
        raised = {"name": e.state.name, "message": e.state.message}
    failed_state = failing.result(raise_on_failure=False)
    # wait_for with the default trigger (all_successful) and with all_finished.
    after_default = flow.submit("double", 8, wait_for=[failing], return_state=True)
    after_finished = flow.submit("double", 7, wait_for=[failing], trigger="all_finished").result()
    # map: futures, and states.
    mapped = [m.result() for m in flow.map_("double", [1, 2, 3])]
    mapped_states = [s.name for s in flow.map_("fail", [1, 2], return_state=True)]
    any_ = flow.wait_any([failing, f])
    flow.wait_all([f, failing])
    try:
        flow.submit("nope", 1)
        refused = "unexpected: accepted"
    except SubmissionRefused as e:
        refused = str(e)
    return {
        "call": called,
        "get_state_before_wait": before.name,
        "wait": {"name": waited.name, "result": str(waited.result())},
        "result": result,
        "raised": raised,
        "failed_state": failed_state.name,
        "failed_is_failed": failed_state.is_failed(),
        "after_default": after_default.name,
        "after_finished": after_finished,
        "map": mapped,
        "map_states": mapped_states,
        "wait_any": any_,
        "refused": refused,
        "id": f.id,
        "now": flow.now(),
        "clock": int(time.time()),
        "hashed": str(random.getrandbits(64)),
        "map_len": 4,
    }
