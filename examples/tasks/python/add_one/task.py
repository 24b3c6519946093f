"""add_one: returns its input plus one."""


def run(x: int) -> int:
    return x + 1
