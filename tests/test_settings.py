"""Settings: one typed object read from LORASWAP_* variables and CLI flags, every one listed in docs/settings.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from server.settings import Settings

SETTINGS_DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"


def test_flags_and_environment(monkeypatch):
    monkeypatch.delenv("LORASWAP_LOG_FORMAT", raising=False)
    assert Settings().log_format == "text"
    monkeypatch.setenv("LORASWAP_LOG_FORMAT", "json")
    assert Settings().log_format == "json"
    settings = CliApp.run(Settings, cli_args=["--log-format", "text", "--max-loaded-adapters", "3"])
    assert (settings.log_format, settings.max_loaded_adapters) == ("text", 3)
    with pytest.raises(ValidationError, match="log_format"):
        Settings(log_format="xml")


def test_the_settings_page_lists_every_setting():
    table = SETTINGS_DOC.read_text().split("**dtype.**", 1)[0]
    listed = set(re.findall(r"`([a-z_]+)`", table))
    assert set(Settings.model_fields) <= listed


def test_auto_dtype_is_float32_on_a_cpu_whatever_its_flags():
    """The dtype the shipped adapters' figures were measured in, so that the defaults reproduce them."""
    from server.base_model import choose_dtype

    assert choose_dtype("auto", "cpu") == "float32"
    assert choose_dtype("bfloat16", "cpu") == "bfloat16"
