"""The tiered FFN wing: FFN neurons served from GPU memory, CPU RAM and flash (issue #15).

store.py   the flash store: every neuron's gate row, up row and down column as one record, in the
           plan's tier order (docs/formats/store.md)
reader.py  O_DIRECT reads of records, planned from the measured read curve, issued through io_uring
           (uring.py) or a thread pool
cache.py   the sliding-window neuron cache: recently used flash neurons kept in RAM slots
trace.py   synthetic active sets (skewed, reused across tokens) for random-weight models
ffn.py     TieredFFN, the engine's FFN over a layer's resident records and window-cache slots
deploy.py  `hetinfer prepare` and deployments (docs/formats/deployment.md); cli.py: its commands
"""
