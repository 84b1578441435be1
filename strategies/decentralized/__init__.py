"""Decentralized training: DeMo (compressed momentum, no gradient all-reduce)
and gossip (neighbour averaging of parameters). Importing registers ``demo``;
``gossip`` lives in ``strategies.gossip``."""
from strategies.decentralized import demo as _demo  # noqa: F401  (registers "demo")
