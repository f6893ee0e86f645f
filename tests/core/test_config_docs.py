import os
from pathlib import Path

import pytest

from server.core import config_docs
from server.core.config import PROJECT_ROOT, Settings


def test_the_configuration_page_and_env_example_are_what_the_settings_render():
    # Stale means a setting was added or described without `python -m server config docs`.
    assert config_docs.CONFIG_PAGE.read_text(encoding="utf-8") == config_docs.render_page()
    assert config_docs.ENV_EXAMPLE.read_text(encoding="utf-8") == config_docs.render_env_example()


def test_every_setting_is_described_and_listed_once():
    page = config_docs.render_page()
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        assert page.count(f"| `{name.upper()}` |") == 1


def test_the_env_example_sets_every_default(monkeypatch):
    # Read as a .env file, the example gives the defaults: its values are valid and say what the code does. Its
    # paths are relative to the project, where the server is started from.
    monkeypatch.chdir(PROJECT_ROOT)
    from_example = Settings(_env_file=config_docs.ENV_EXAMPLE)
    defaults = Settings(_env_file=None)

    def shown(value: object) -> object:
        return value.resolve() if isinstance(value, Path) else str(value).replace(str(PROJECT_ROOT), ".")

    for name in Settings.model_fields:
        if name.upper() not in os.environ:
            assert shown(getattr(from_example, name)) == shown(getattr(defaults, name)), name


def test_a_section_naming_no_setting_is_an_error(monkeypatch):
    monkeypatch.setattr(config_docs, "SECTIONS", (("Gone", "no_such_setting"),))
    with pytest.raises(ValueError, match="no_such_setting"):
        config_docs.render_page()
