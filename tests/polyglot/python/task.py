"""The Python test guest: the input's "do" picks a behaviour (see ../README.md)."""

import os
import socket
import sys

import sluice
from sluice import context, http, log
from wordcount import count_words


def run(input):
    mode = input["do"]
    if mode == "fail":
        raise sluice.Fail("failing on purpose")
    if mode == "retry":
        raise sluice.Retry("try again")
    if mode == "retry_after":
        raise sluice.Retry("later", delay=input["ms"] / 1000)
    if mode == "skip":
        raise sluice.Skip("nothing to do")
    if mode == "pause":
        return sluice.Pause("waiting for approval")
    if mode == "success":
        raise sluice.Success("done early", output={"answer": 42})
    if mode == "context":
        return {
            "flow_run_id": context.flow_run_id(),
            "task_run_id": context.task_run_id(),
            "task_name": context.task_name(),
            "attempt": context.attempt(),
            "map_index": context.map_index(),
            "parameters": context.parameters(),
            "get": {key: context.get(key) for key in input["keys"]},
        }
    if mode == "log":
        log.trace("trace line")
        log.debug("debug line")
        log.info("info line")
        log.warn("warn line")
        log.error("error line")
        print("to stdout")
        print("to stderr", file=sys.stderr)
        return "logged"
    if mode == "loop":
        i = 0
        while True:
            i += 1
    if mode == "memory_bomb":
        blocks = []
        while True:
            block = bytearray(1 << 20)
            block[4096] = 1
            blocks.append(block)
    if mode == "crash":
        raise ValueError("boom")
    if mode == "echo":
        return input["value"]
    if mode == "words":
        return {"words": count_words(input["text"])}
    if mode == "probe":
        return [attempt(step) for step in input["steps"]]
    raise sluice.Fail(f"unknown mode {mode!r}")


def attempt(step):
    """One probe step's result: ``{"ok": value}`` or ``{"err": "text"}``; never raises."""
    try:
        return {"ok": probe(step)}
    except http.HTTPError as e:
        return {"err": e.code}
    except Exception as e:
        return {"err": f"{type(e).__name__}: {e}"}


def probe(step):
    what = step["do"]
    if what == "read":
        with open(step["path"]) as f:
            return f.read()
    if what == "write":
        with open(step["path"], "w") as f:
            f.write(step["text"])
        return None
    if what == "env":
        return sluice.env(step["name"])
    if what == "secret":
        return sluice.secret(step["name"])
    if what == "env_names":
        return sorted(os.environ)
    if what == "http":
        r = http.request(
            step.get("method", "GET"),
            step["url"],
            headers=dict(step.get("headers", [])),
            body=step.get("body"),
        )
        return {"status": r.status_code, "body": r.text}
    if what == "get_json":
        return http.get_json(step["url"])
    if what == "connect":
        host, port = step["addr"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"ping\n")
            return conn.makefile().readline().rstrip("\n")
    raise ValueError(f"unknown step {what!r}")
