from pathlib import Path

import pytest

from server.ml.generator import TextGenerator
from server.ml.loader import locate

SHORT, MIDDLE, LONG = (
    "The cat",
    "Once upon a time there was a small village",
    ("The stock market rose sharply on Tuesday after the central bank held interest rates steady and"),
)


@pytest.fixture(scope="module")
def generator(standins: tuple[Path, Path]) -> TextGenerator:
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    return TextGenerator.load(location, str(standins[0].parent))
