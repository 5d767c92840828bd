"""The offline half: activation profiles, Deja Vu-style predictors, sparse-quality evaluation.

artifact.py    Profile, load_profile, the artefact directory format
collect.py     profile_sequences: per-neuron statistics over calibration sequences
runner.py      layer-by-layer batched forward the offline tools run on
predictors.py  low-rank predictors: training, Predictors, load_predictors
evaluate.py    perplexity / top-1 agreement / KL of sparse FFN modes against dense
plot.py        frequency and sparsity-vs-threshold figures
cli.py         the profile, train-predictors and eval subcommands
"""
from hetinfer.profiler.artifact import Profile, load_profile

__all__ = ["Profile", "load_profile"]
