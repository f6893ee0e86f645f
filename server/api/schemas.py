"""What every route family's bodies share: the error answers, integer bounds, UTC timestamps."""

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field

# Bounds of integer parameters, so that no value reaches the database out of its column's range (a 500): record
# keys are 32-bit on PostgreSQL; an offset past a million rows is a scan no page needs (use the cursor).
MAX_ROW_ID = 2**31 - 1
MAX_OFFSET = 1_000_000
# SQLite returns naive datetimes; every timestamp the server stores is UTC.
UtcDatetime = Annotated[datetime, AfterValidator(lambda d: d if d.tzinfo else d.replace(tzinfo=UTC))]


class ErrorOut(BaseModel):
    detail: str


class BlockedPromptOut(BaseModel):
    detail: str
    index: int = Field(description="Position of the refused prompt in `prompts`")


class RateLimitedOut(BaseModel):
    detail: str
    policy: str = Field(description="The policies that refused the request, comma-separated")
