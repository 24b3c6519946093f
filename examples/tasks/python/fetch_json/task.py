"""fetch_json: GETs the JSON document at the input's ``url`` and returns it.

The task reaches the network only as far as its ``http`` grant allows; a URL outside it fails
the task run (the run's log names the refused URL). A status other than 2xx fails it too, and a
server that cannot be reached asks for a retry.
"""

import sluice
from sluice import http, log


def run(input):
    url = input["url"]
    try:
        document = http.get_json(url, headers={"accept": "application/json"})
    except http.HTTPError as e:
        if e.code in ("ConnectionRefused", "ConnectionTimeout", "DnsTimeout"):
            raise sluice.Retry(f"GET {url}: {e.code}")
        raise sluice.Fail(f"GET {url}: {e.code}" + (f" {e.detail}" if e.detail else ""))
    except ValueError as e:
        raise sluice.Fail(f"GET {url}: the answer is not JSON ({e})")
    log.info(f"fetched {url}")
    return document
