"""Compute cost of a trained model per prediction: MACs, FLOPs, weights and seed 002's energy estimate.

The counting lives in :mod:`nilmc.compiler.cost` (the compiler writes the same numbers into every bundle's
manifest); this module keeps the names the training code and its tests use.
"""
from __future__ import annotations

from nilmc.compiler.cost import SEED002_J_PER_FLOP, graph_cost, node_macs, tensor_shapes

__all__ = ["SEED002_J_PER_FLOP", "graph_cost", "node_macs", "tensor_shapes"]
