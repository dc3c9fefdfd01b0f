"""A pipeline that fails on purpose: `explode` raises on every attempt, so `publish`
ends upstream_failed while `cleanup` (trigger all_done) still runs."""

from typing import Any


def prepare(ctx: Any) -> str:
    print("preparing")
    return "ready"


def explode(ctx: Any) -> None:
    print(f"attempt {ctx.attempt}: about to fail")
    raise RuntimeError(f"boom on attempt {ctx.attempt}")


def cleanup(ctx: Any) -> dict[str, Any]:
    print(f"cleaning up; explode gave {ctx.upstream['explode']!r}")
    return {"explode": ctx.upstream["explode"]}
