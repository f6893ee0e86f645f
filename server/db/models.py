"""Tables. Schema changes go through an Alembic migration in `migrations/versions/`."""

from datetime import datetime
from typing import TYPE_CHECKING, ClassVar

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from server.core.tenants import DEFAULT_TENANT


class Base(DeclarativeBase):
    if TYPE_CHECKING:
        # Every class here maps a Table; SQLAlchemy types __table__ as any FromClause.
        __table__: ClassVar[Table]


class GenerationRecord(Base):
    __tablename__ = "generations"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_TENANT)
    prompt: Mapped[str] = mapped_column(Text)
    generated_text: Mapped[str] = mapped_column(Text)
    completion: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(255))
    params: Mapped[dict] = mapped_column(JSON)
    finish_reason: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class PredictionRecord(Base):
    __tablename__ = "predictions"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_TENANT)
    text: Mapped[str] = mapped_column(Text)
    label: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    model: Mapped[str] = mapped_column(String(255))
    latency_ms: Mapped[float] = mapped_column(Float)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
