"""The smallest pipeline: one task that greets and says where it ran."""

from typing import Any


def hello(ctx: Any, name: str) -> str:
    greeting = f"hello, {name}, from node {ctx.node_id} (run {ctx.run_id})"
    print(greeting)
    return greeting
