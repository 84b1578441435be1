"""How one training step is parallelised across ranks, and the strategy registry."""
from strategies.base import NoOptions, OptimConfig, StepStats, Strategy, StrategyContext
from strategies.registry import STRATEGIES, register_strategy

from strategies import (  # noqa: F401  (register built-ins)
    compression as _compression, ddp as _ddp, decentralized as _decentralized, fsdp as _fsdp, gossip as _gossip,
    pipeline as _pipeline, sequence as _sequence, single as _single, zero as _zero,
)
from strategies import mesh as _mesh  # noqa: F401,E402  (any composition: the parts' options, last)

__all__ = ["NoOptions", "OptimConfig", "STRATEGIES", "StepStats", "Strategy", "StrategyContext", "register_strategy"]
