"""PROFILESTREAM_SETTINGS_FILE: a .env or TOML file read before the environment."""

from __future__ import annotations

import os

import pytest

from handlers.errors import ConfigError
from stream.settings import ENV_PREFIX, load_settings, settings_environment

FILE_VARIABLE = f"{ENV_PREFIX}SETTINGS_FILE"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Remove the PROFILESTREAM_* settings of the calling shell, keeping the test suite's own variables."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) and not name.startswith(f"{ENV_PREFIX}TEST_") and name != f"{ENV_PREFIX}CACHE_DIR":
            monkeypatch.delenv(name)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_dotenv_file_values(tmp_path, monkeypatch):
    path = write(tmp_path / "worker.env", "PROFILESTREAM_APP_ID=from-file\nPROFILESTREAM_PARTITIONS=8\n# a comment\n")
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    settings = load_settings()
    assert settings.app_id == "from-file"
    assert settings.partitions == 8


def test_toml_file_values(tmp_path, monkeypatch):
    path = write(tmp_path / "worker.toml", 'app_id = "from-toml"\npartitions = 6\nllm_timeout_s = 12.5\n')
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    settings = load_settings()
    assert settings.app_id == "from-toml"
    assert settings.partitions == 6
    assert settings.llm_timeout_s == 12.5


def test_environment_wins_over_file(tmp_path, monkeypatch):
    path = write(tmp_path / "worker.env", "PROFILESTREAM_APP_ID=from-file\nPROFILESTREAM_PARTITIONS=8\n")
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    monkeypatch.setenv(f"{ENV_PREFIX}APP_ID", "from-environment")
    settings = load_settings()
    assert settings.app_id == "from-environment"
    assert settings.partitions == 8


def test_environment_wins_over_toml(tmp_path, monkeypatch):
    path = write(tmp_path / "worker.toml", 'app_id = "from-toml"\n')
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    monkeypatch.setenv(f"{ENV_PREFIX}APP_ID", "from-environment")
    assert load_settings().app_id == "from-environment"


def test_argument_names_file(tmp_path):
    path = write(tmp_path / "worker.env", "PROFILESTREAM_APP_ID=from-file\n")
    settings = load_settings(settings_file=str(path))
    assert settings.app_id == "from-file"
    assert settings.settings_file == str(path)


def test_argument_wins_over_file(tmp_path):
    path = write(tmp_path / "worker.env", "PROFILESTREAM_APP_ID=from-file\n")
    assert load_settings(settings_file=str(path), app_id="from-argument").app_id == "from-argument"


def test_file_secret_stays_secret(tmp_path, monkeypatch):
    path = write(tmp_path / "worker.env", "PROFILESTREAM_LLM_API_KEY=sk-file-secret\n")
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    settings = load_settings()
    assert settings.llm_api_key.get_secret_value() == "sk-file-secret"
    assert "sk-file-secret" not in repr(settings)


def test_missing_file_names_variable(tmp_path, monkeypatch):
    path = tmp_path / "absent.env"
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert FILE_VARIABLE in str(caught.value)
    assert str(path) in str(caught.value)
    assert "not found" in str(caught.value)


def test_dotenv_unknown_setting(tmp_path, monkeypatch):
    path = write(tmp_path / "worker.env", "PROFILESTREAM_APP_ID=x\nPROFILESTREAM_PARTITIONZ=3\n")
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "PROFILESTREAM_PARTITIONZ" in str(caught.value)
    assert str(path) in str(caught.value)


def test_dotenv_name_without_prefix(tmp_path, monkeypatch):
    path = write(tmp_path / "worker.env", "app_id=x\n")
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "unknown setting app_id" in str(caught.value)


def test_toml_unknown_setting(tmp_path, monkeypatch):
    path = write(tmp_path / "worker.toml", 'PROFILESTREAM_APP_ID = "x"\n')
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "unknown setting PROFILESTREAM_APP_ID" in str(caught.value)


def test_file_cannot_name_another_file(tmp_path, monkeypatch):
    other = write(tmp_path / "other.env", "PROFILESTREAM_APP_ID=x\n")
    path = write(tmp_path / "worker.toml", f'settings_file = "{other}"\n')
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "unknown setting settings_file" in str(caught.value)


def test_invalid_toml(tmp_path, monkeypatch):
    path = write(tmp_path / "worker.toml", "app_id = \n")
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "invalid TOML" in str(caught.value)
    assert str(path) in str(caught.value)


def test_invalid_value_in_file_names_variable(tmp_path, monkeypatch):
    path = write(tmp_path / "worker.env", "PROFILESTREAM_PARTITIONS=0\n")
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "PROFILESTREAM_PARTITIONS" in str(caught.value)


def test_no_file_by_default():
    settings = load_settings()
    assert settings.settings_file is None
    assert settings.app_id == "profilestream"


def test_settings_environment_round_trip(tmp_path, monkeypatch):
    """settings_environment reproduces settings from a file, the environment and arguments in a child's environment."""
    path = write(tmp_path / "worker.toml", 'profile_language = "zh"\nllm_timeout_s = 12.5\n')
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    monkeypatch.setenv(f"{ENV_PREFIX}LLM_API_KEY", "sk-round-trip")
    original = load_settings(llm_base_url="http://127.0.0.1:9/v1", llm_model="m", postgres_sslmode="require",
                             postgres_dsn="postgresql://user:secret@127.0.0.1:5/db", http_port=1234)
    environment = settings_environment(original)
    assert FILE_VARIABLE not in environment
    assert f"{ENV_PREFIX}KAFKA_SASL_PASSWORD" not in environment
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) and not name.startswith(f"{ENV_PREFIX}TEST_") and name != f"{ENV_PREFIX}CACHE_DIR":
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    reloaded = load_settings()
    assert reloaded.settings_file is None
    assert reloaded == original.model_copy(update={"settings_file": None})
    assert reloaded.llm_api_key.get_secret_value() == "sk-round-trip"
