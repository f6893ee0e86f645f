"""Records of every generation and prediction: buffered writes (`writer`), idempotent isolating inserts
(`store`), spill files (`spill`) and their replay (`replay`)."""

from server.services.records.writer import RecordWriter

__all__ = ["RecordWriter"]
