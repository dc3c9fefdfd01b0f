"""Core services: the HTTP API that nodes report to (docs/reference/http-api.md).

limits.py (body size) -> fastpath.py (heartbeats) -> app.py (FastAPI: everything else)
-> auth.py (who is asking) -> heartbeats.py (group commit) -> storage.py (SQLAlchemy Core:
SQLite by default, PostgreSQL for replicas). listen.py runs it under uvicorn.
"""
