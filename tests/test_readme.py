"""The README's configuration table matches the settings."""

from pathlib import Path

from stream.settings import settings_table

README = Path(__file__).parent.parent / "README.md"


def test_settings_table_current():
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- settings-table:start -->\n") + len("<!-- settings-table:start -->\n")
    end = text.index("<!-- settings-table:end -->")
    assert text[start:end].strip() == settings_table(), "regenerate with: python -c 'from stream.settings import settings_table; print(settings_table())'"
