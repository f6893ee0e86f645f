"""`python -m server bench-analytics`, tiny: it fills through the writer and times the real route."""

from server.__main__ import parser
from server.bench.analytics import run


async def test_the_analytics_bench_fills_and_aggregates(database_url):
    args = parser(["bench-analytics"]).parse_args(
        ["bench-analytics", "--records", "300", "--days", "2", "--repeat", "2", "--database-url", database_url]
    )
    result = await run(args)
    assert result["total_requests"] == 300 and result["records"] == 300
    assert 1 <= result["buckets"] <= 49 and result["rollup_rows"] >= result["buckets"]
    assert result["database"] == database_url.split("+")[0]
