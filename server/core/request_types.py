"""The string and body rules every request follows, wherever it is accepted: the interactive API and the batch
offload's item bodies (services/offload/bodies.py) validate with the same types."""

import re
from typing import Annotated

from pydantic import AfterValidator, ConfigDict, Field, StrictStr
from pydantic_core import PydanticCustomError

_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    """Refuse what no backend stores faithfully: NUL (PostgreSQL text cannot hold it) and lone surrogates
    (JSON's `\\ud800` escapes decode to them; they are not Unicode and cannot be encoded as UTF-8)."""
    if (nul := text.find("\x00")) >= 0:
        raise PydanticCustomError(
            "string_nul",
            "String contains a NUL character (U+0000) at index {index}, which cannot be stored",
            {"index": nul},
        )
    if surrogate := _SURROGATE.search(text):
        raise PydanticCustomError(
            "string_surrogate",
            "String is not valid Unicode: lone surrogate U+{code} at index {index}",
            {"code": f"{ord(surrogate[0]):04X}", "index": surrogate.start()},
        )
    return text


# Every string a request body carries: a real string (no coercion), storable by every backend.
Text = Annotated[StrictStr, AfterValidator(storable)]
Prompt = Annotated[Text, Field(min_length=1)]
# Request bodies are strict ("20" is not a number, true is not an int; an int is still a float) and refuse the
# NaN and Infinity that Python's json parser accepts.
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
