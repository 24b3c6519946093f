"""retry_if_negative: raises RETRY while its input is negative, else returns it."""

import sluice


def run(x: int) -> int:
    if x < 0:
        raise sluice.Retry(f"{x} is negative")
    return x
