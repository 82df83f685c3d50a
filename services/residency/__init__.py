"""The model residency service: one per Triton server, the only caller of its model repository API.

Triton runs in explicit model-control mode, so nothing is loaded unless this service asks. Workers and
detectors call EnsureLoaded with the models a job needs; under the server's GPU memory budget the least
recently used models are unloaded first, and the pinned ones (the built-in set, the sets marked default)
are loaded at start and never unloaded.
"""
