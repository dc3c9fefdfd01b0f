"""A small ETL pipeline that exercises every channel a task has.

extract -> validate ─┐
        -> transform -> enrich ─┤
greet (reads an env variable) ──┴-> report (all_done)

- upstream results: transform reads extract's records, report reads everyone's;
- ctx.store: extract stores the raw records, validate counts them with incr;
- ctx.events: transform publishes the total on "etl.totals", enrich waits for it;
- the environment: greet returns the variable named in its args (set it with
  `imagefactory boot --env ETL_GREETING=...`);
- stdout and stderr: every task prints, validate warns on stderr.
"""

from __future__ import annotations

import os
import sys
from typing import Any

TOTALS_TOPIC = "etl.totals"


def extract(ctx: Any, n: int) -> list[dict[str, int]]:
    records = [{"id": i, "value": i * i} for i in range(1, n + 1)]
    ctx.store["raw"] = records
    print(f"extracted {len(records)} records")
    return records


def validate(ctx: Any) -> int:
    records = ctx.store["raw"]
    for record in records:
        if record["value"] % 2:
            print(f"warning: odd value in record {record['id']}", file=sys.stderr)
        ctx.store.incr("validated")
    ctx.log.info("validated %d records", len(records))
    return int(ctx.store["validated"])


def transform(ctx: Any) -> dict[str, int]:
    records = ctx.upstream["extract"]
    totals = {"count": len(records), "sum": sum(r["value"] for r in records)}
    ctx.events.publish(TOTALS_TOPIC, totals)
    print(f"transformed: {totals}")
    return totals


def enrich(ctx: Any) -> dict[str, Any]:
    totals = ctx.events.wait(TOTALS_TOPIC, timeout=60)
    enriched = {**totals, "mean": totals["sum"] / totals["count"]}
    print(f"enriched: {enriched}")
    return enriched


def greet(ctx: Any, variable: str) -> str | None:
    value = os.environ.get(variable)
    print(f"{variable}={value!r}")
    return value


def report(ctx: Any) -> dict[str, Any]:
    summary = {
        "validated": ctx.upstream["validate"],
        "enriched": ctx.upstream["enrich"],
        "greeting": ctx.upstream["greet"],
        "stored_records": len(ctx.store.get("raw", [])),
        "node_id": ctx.node_id,
        "run_id": ctx.run_id,
    }
    print(f"report: {summary}")
    return summary
