"""Placement: which tier (GPU memory, CPU RAM, flash) every FFN neuron lives on.

hardware.py  tiers, capacities and speeds; the JSON description of a machine; size parsing
probe.py     `detect`: this machine's tiers from cached kernel and flash probes
cost.py      byte sizes and the expected time per token of a placement
ilp.py       the ILP over neuron groups (PuLP/CBC), the greedy baseline, the fill-up pass
plan.py      the plan artefact (docs/formats/plan.md); `load_plan` is what the engine reads
synth.py     profiles for models never profiled (rescaled or power law)
cli.py       `hetinfer place`
"""
from hetinfer.tiers import TIERS
from hetinfer.placement.plan import Plan, PlanError, load_plan

__all__ = ["TIERS", "Plan", "PlanError", "load_plan"]
