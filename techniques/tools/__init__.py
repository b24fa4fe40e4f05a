"""Helpers the techniques share and are not techniques: `inputs` (a batch's plumbing: calling a model on
positional or keyword inputs, moving and slicing them) and `tracing` (Torch-Pruning's dependency graph of a model,
and the check that a structural cut kept its outputs)."""
