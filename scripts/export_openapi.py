"""Write docs/reference/openapi.json: the OpenAPI document of `imagefactory serve`.

    .venv/bin/python scripts/export_openapi.py           # (re)write the file
    .venv/bin/python scripts/export_openapi.py --check   # exit 1 if the file is stale

The document is the one the server answers at `GET /openapi.json`, taken from an app
built as `imagefactory serve` builds it (imagefactory.server.app.create_app) over a
throw-away SQLite file, without listening anywhere. It is written deterministically
(sorted keys, indent 2, trailing newline), so the file changes only when the API does.
tests/unit/test_reference_docs.py fails while the file is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "reference" / "openapi.json"
REGENERATE = ".venv/bin/python scripts/export_openapi.py"


def openapi_document() -> dict[str, Any]:
    """The server's OpenAPI document, as FastAPI builds it."""
    from fastapi import FastAPI

    from imagefactory.server.app import create_app
    from imagefactory.server.config import ServerConfig, database_url
    from imagefactory.server.storage import Storage

    with tempfile.TemporaryDirectory(prefix="export-openapi-") as tmp:
        url = database_url(str(Path(tmp) / "services.db"))
        storage = Storage(url)
        try:
            config = ServerConfig(db_url=url, secret="secret", admin_token="admin")
            app: Any = create_app(config, storage)
            # create_app wraps the FastAPI app in plain ASGI layers (body limit, heartbeat
            # fast path), each holding the next one as `.app`.
            while not isinstance(app, FastAPI):
                app = app.app
            document: dict[str, Any] = app.openapi()
        finally:
            storage.close()
    return document


def render() -> str:
    """The exact text of docs/reference/openapi.json."""
    return json.dumps(openapi_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="do not write; exit 1 if the file is stale"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"default: {OUTPUT}")
    args = parser.parse_args(argv)
    text = render()
    output: Path = args.output
    if args.check:
        current = output.read_text(encoding="utf-8") if output.exists() else None
        if current != text:
            print(f"{output} is stale; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
