"""`executor agent`: the service mode inside images (docs/reference/README.md).

    main.py      lifecycle: config -> pipeline -> run -> spool -> deliver -> poweroff
    config.py    EXECUTOR_* environment -> frozen AgentConfig
    runner.py    the one call into the engine
    heartbeat.py heartbeats from their own thread, never blocking the run
    gateway.py   GET /v1/pipelines/NAME and the sha256 check
    delivery.py  the durable spool and report delivery
    reportlog.py the combined log as it goes into the report (cut to fit the server's limit)
    master.py    urllib requests to the master, classified as ok / transient / refused

Standard library and tenacity only: the agent is baked into images without network access.
"""
