"""Scheduling: how items reach a model. The `Batcher` contract (`interface`), the static micro-batcher (`static`),
the continuous decoding loop (`continuous`), and what both share (`admission`: the bounded queue, the linger, the
callers' deadlines)."""
