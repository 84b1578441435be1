"""Decentralized and low-bandwidth training: strategies that never all-reduce
gradients, and the pieces a composition uses as its outer sync across nodes.

- ``demo``: DeMo (compressed momentum; ``DeMo`` works on any tensors over any ``Comm``).
- ``gossip``: neighbour averaging of parameters (``mixing.GossipMixer`` does the mixing).
- ``diloco``: DiLoCo's outer Nesterov step every H inner steps (``DiLoCo``).

Importing registers the strategies ``demo`` and ``gossip``.
"""
from strategies.decentralized import demo as _demo, gossip as _gossip  # noqa: F401  (register "demo", "gossip")
