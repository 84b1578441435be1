from workloads.registry import Registry

STRATEGIES: Registry = Registry("strategy", "polytrain.strategies")
register_strategy = STRATEGIES.register
