from strategies.base import Strategy
from workloads.registry import Registry

STRATEGIES: Registry = Registry("strategy", "polytrain.strategies", Strategy)
register_strategy = STRATEGIES.register
