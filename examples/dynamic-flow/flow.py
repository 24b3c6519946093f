"""A flow whose shape depends on its results (see flow.toml): it doubles a number until it
reaches the target, adds one to every value it collected (a map), sums them, and branches on
whether a budget check failed, reading the failure with ``result(raise_on_failure=False)``."""

from sluice import flow, log


def run(parameters):
    # Loop until a condition: each call's output decides whether there is another.
    x = parameters["start"]
    grown = []
    while x < parameters["target"]:
        x = flow.call("double", x)
        grown.append(x)
    # Map over what the loop collected: one mapped task run, a future per element.
    bumped = [f.result() for f in flow.map_("add_one", grown)]
    total = flow.call("sum", bumped)
    # Branch on a failed task: `over_budget` fails when the total is over the budget.
    check = flow.submit("over_budget", total > parameters["budget"])
    outcome = check.result(raise_on_failure=False)
    if isinstance(outcome, flow.State) and outcome.is_failed():
        log.warn(f"{total} is over the budget of {parameters['budget']} ({outcome.message}): "
                 "keeping the smaller half")
        kept = sorted(bumped)[: len(bumped) // 2]
        return {"grown": grown, "kept": kept, "total": flow.call("sum", kept), "branch": "over budget"}
    return {"grown": grown, "kept": bumped, "total": total, "branch": "within budget"}
