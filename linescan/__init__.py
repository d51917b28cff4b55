"""linescan: streaming unsupervised defect inspection for line-scan cameras.

The data path, one module a step:
frame (ingest) -> lines -> tiles (tiling) -> batch (batching) -> engine (backends)
-> stitch (tiling) -> residual -> mask/regions (segment) -> event (events, publish).
"""

__version__ = "0.1.0"
