"""`python -m server bench`: the server measured against the hardware's limit and the naive recipe."""
