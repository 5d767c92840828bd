"""The memory tiers, one vocabulary for the whole project: placement, plans, the store, the server.

A tier's code is its index in TIERS (fastest first). Kept apart from `placement.cost` so the
server and the engine can name tiers without importing the placement solver.
"""
TIERS = ("gpu", "ram", "flash")
GPU, RAM, FLASH = 0, 1, 2
