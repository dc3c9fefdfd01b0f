"""The engine: run a pipeline's DAG on a pool of pre-forked workers.

`manager.py` owns all scheduling state; `pool.py` starts workers and their pipes;
`worker.py` runs tasks; `messages.py` names what crosses the pipes; `capture.py` and
`combined_log.py` turn task output into the one combined log; `results.py` writes the
results document.
"""
