"""The tiered FFN wing: FFN neurons served from GPU memory, CPU RAM and flash (issue #15).

store.py   the flash store: every neuron's gate row, up row and down column as one record, in the
           plan's tier order (docs/formats/store.md)
ffn.py     TieredFFN, the engine's FFN over a layer's resident records and window-cache slots
deploy.py  `hetinfer prepare` and deployments (docs/formats/deployment.md); cli.py: its commands
"""
