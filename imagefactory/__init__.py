"""imagefactory: bakes, seeds and boots VM images that run the executor, and serves the nodes."""

__version__ = "0.1.0"
