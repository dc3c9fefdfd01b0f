"""executor: the agent baked into every image. Loads a pipeline DAG and runs it on a
multiprocessing worker pool, with a shared store, events and one combined log.

Runtime dependencies: the standard library and tenacity only, so that it can be
installed into an image without network access.
"""

__version__ = "0.1.0"
