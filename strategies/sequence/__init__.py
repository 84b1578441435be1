"""Sequence parallelism: Ulysses all-to-all, ring attention and their hybrid (USP).

``layout`` says which tokens each rank holds and which attention blocks a ring
step computes; ``kernels`` computes one block with its log-sum-exp;
``attention`` distributes attention exactly (forward and backward);
``part`` applies it to a model on the mesh's ``sp`` axis; ``strategy`` is the
registered ``sequence`` strategy (the part with data parallelism).
"""
from strategies.sequence.attention import SequenceParallelAttention, Traffic, ring_attention, ulysses_gather, ulysses_scatter
from strategies.sequence.layout import Block, SequenceLayout, block_plan
from strategies.sequence.strategy import SequenceOptions, SequenceParallel

__all__ = [
    "Block", "SequenceLayout", "SequenceOptions", "SequenceParallel", "SequenceParallelAttention", "Traffic",
    "block_plan", "ring_attention", "ulysses_gather", "ulysses_scatter",
]
