"""extract: parses CSV text (a header row, then one order per row) into records.

Each record keeps the raw fields: {"id": int, "customer": str, "amount": str}. Blank lines and
lines starting with # are ignored; a malformed row fails the task naming its line.
"""

import csv
import io

import sluice
from sluice import log

COLUMNS = ("id", "customer", "amount")


def run(text: str) -> list:
    if not isinstance(text, str):
        raise sluice.Fail(f"expected CSV text, got {type(text).__name__}")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(lines)), skipinitialspace=True)
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise sluice.Fail(f"expected the columns {', '.join(COLUMNS)}, got {reader.fieldnames}")
    records = []
    for row in reader:
        try:
            records.append(
                {"id": int(row["id"]), "customer": row["customer"].strip(), "amount": row["amount"]}
            )
        except (TypeError, ValueError) as e:
            raise sluice.Fail(f"row {reader.line_num}: {e}")
    log.info(f"extracted {len(records)} records")
    return records
