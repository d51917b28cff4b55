"""The daemon's stages, one module a step of the data path (``service.py`` runs them).

    receive.py  frame   -> ReceivedFrame   ZeroMQ receive, validation, seq/line numbering,
                                           overload policy
    tile.py     lines   -> TileWork        a Band per camera: tile rows, segment breaks
    infer.py    batch   -> InferResult     batches fill across frames; engine errors
    post.py     stitch, residual, mask,    a Tracker per camera; frame accounting and latency;
                regions                    the status heartbeat
    event.py    event                      defect and status payloads, journaled and published

Between them: ``items.py`` (the typed queue items and the stop sentinel), ``flow.py`` (stopping,
failure, a put that wakes up) and ``state.py`` (the counters several stages write).
"""
