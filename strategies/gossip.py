"""Moved to ``strategies.decentralized.gossip`` (next to DeMo); this name stays
so that users' ``from strategies.gossip import Gossip`` keeps working."""
from strategies.decentralized.gossip import Gossip, GossipOptions  # noqa: F401

__all__ = ["Gossip", "GossipOptions"]
