"""Settings: one typed object read from LORASWAP_* variables and CLI flags, every one listed in the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from server.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_flags_and_environment(monkeypatch):
    monkeypatch.delenv("LORASWAP_LOG_FORMAT", raising=False)
    assert Settings().log_format == "text"
    monkeypatch.setenv("LORASWAP_LOG_FORMAT", "json")
    assert Settings().log_format == "json"
    settings = CliApp.run(Settings, cli_args=["--log-format", "text", "--max-loaded-adapters", "3"])
    assert (settings.log_format, settings.max_loaded_adapters) == ("text", 3)
    with pytest.raises(ValidationError, match="log_format"):
        Settings(log_format="xml")


def test_readme_lists_every_setting():
    section = README.read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z_]+)`", section))
    assert set(Settings.model_fields) <= listed
