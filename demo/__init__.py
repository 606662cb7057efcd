"""``edgelora demo`` (``run``), the tenant tasks it trains (``tasks``), and the tiny models built from configs
that the demo's base, the tests, the benchmarks and the examples start from (``tiny_models``)."""
