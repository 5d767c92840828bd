"""Placement: which tier (GPU memory, CPU RAM, flash) every FFN neuron lives on.

hardware.py  tiers, capacities and speeds; the JSON description of a machine; size parsing
probe.py     `detect`: this machine's tiers from cached kernel and flash probes
cost.py      byte sizes and the expected time per token of a placement
ilp.py       the ILP over neuron groups (PuLP/CBC), the greedy baseline, the fill-up pass
plan.py      the plan artefact (docs/formats/plan.md); `load_plan` is what the engine reads
manifest.py  the plan manifest `hetinfer place` builds from the solver's result
synth.py     profiles for models never profiled (rescaled or power law)
cli.py       `hetinfer place`

Importing this package (and reading a plan) does not import the solver (PuLP).
"""
from hetinfer.placement.plan import Plan, PlanError, load_plan
from hetinfer.tiers import TIERS

__all__ = ["TIERS", "Plan", "PlanError", "load_plan"]
