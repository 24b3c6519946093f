"""try_unlock: true when the context key `key` is "abc", else FAIL."""

import sluice
from sluice import context


def run(_input) -> bool:
    if context.get("key") == "abc":
        return True
    raise sluice.Fail("the context key `key` does not unlock this task")
