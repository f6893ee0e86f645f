from prometheus_client import REGISTRY


def metric(name: str, **labels: str) -> float:
    """Current value of a sample in the default registry (0 when it was never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
