"""How one training step is parallelised across ranks, and the strategy registry."""
from strategies.base import NoOptions, OptimConfig, StepStats, Strategy, StrategyContext
from strategies.registry import STRATEGIES, register_strategy

from strategies import (  # noqa: F401  (register built-ins)
    decentralized as _decentralized, ddp as _ddp, fsdp as _fsdp, gossip as _gossip, single as _single, zero as _zero,
)

__all__ = ["NoOptions", "OptimConfig", "STRATEGIES", "StepStats", "Strategy", "StrategyContext", "register_strategy"]
