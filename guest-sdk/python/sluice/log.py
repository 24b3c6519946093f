"""Structured logging into the task run's record (``print`` to stdout or stderr is kept too)."""

from wit_world.imports import log as _wit


def _log(level, message):
    _wit.log(level, str(message))


def trace(message):
    """Log at TRACE level."""
    _log(_wit.Level.TRACE, message)


def debug(message):
    """Log at DEBUG level."""
    _log(_wit.Level.DEBUG, message)


def info(message):
    """Log at INFO level."""
    _log(_wit.Level.INFO, message)


def warn(message):
    """Log at WARN level."""
    _log(_wit.Level.WARN, message)


def error(message):
    """Log at ERROR level."""
    _log(_wit.Level.ERROR, message)


warning = warn
