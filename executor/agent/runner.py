"""The one place the agent calls the engine: load the pipeline, run it, return the results.

Everything about the engine's interface (RunConfig, the progress callback) stays here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from executor.agent.config import AgentConfig
from executor.engine import manager
from executor.engine.combined_log import CombinedLog
from executor.pipeline import load_pipeline

GRACE_S = 5.0


def run_pipeline(
    config: AgentConfig, source: Path, log_path: Path, on_progress: manager.ProgressCallback
) -> dict[str, Any]:
    """Run the pipeline at `source`; raises PipelineError if it is invalid."""
    run = config.run
    with CombinedLog(log_path) as combined:
        combined.executor(f"agent: node {run.node_id} run {run.run_id} pipeline {source}")
    pipeline = load_pipeline(source, config.archive_limits)
    on_progress(0, len(pipeline.tasks))
    run_config = manager.RunConfig(
        workers=run.workers,
        run_id=run.run_id,
        node_id=run.node_id,
        log_path=log_path,
        grace_s=GRACE_S,
        # Workers fork from a fresh interpreter, not from the agent: no task's memory
        # holds the node token (executor/agent/secret.py).
        start_method="forkserver",
    )
    results: dict[str, Any] = manager.run(pipeline, run_config, on_progress)
    return results
