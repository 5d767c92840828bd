"""The tiered FFN wing: FFN neurons served from GPU memory, CPU RAM and flash (issue #15).

store.py  the flash store: every neuron's gate row, up row and down column as one record,
          in the plan's tier order (docs/formats/store.md)
"""
