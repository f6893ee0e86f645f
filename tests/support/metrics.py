from prometheus_client import REGISTRY


def metric(name: str, **labels: str) -> float:
    """Current value of a sample in the default registry (0 when it was never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def counted(page: str, counter: str, label: str) -> float:
    """The sum of `counter` over the series that carry `label` in a server's Prometheus text page (`GET /metrics`
    of another process, whose registry is not this one's)."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith(f"{counter}{{") and label in line
    )
