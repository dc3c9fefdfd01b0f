"""Core services: the HTTP API that nodes report to (DESIGN.md section 6).

app.py (routes) -> auth.py (who is asking) -> heartbeats.py (group commit of heartbeats)
-> storage.py (SQLAlchemy Core: SQLite by default, PostgreSQL for replicas).
"""
