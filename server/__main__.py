"""`loraswap` command: serve the app with settings from env vars (LORASWAP_*) and CLI flags."""

from __future__ import annotations

import logging

import uvicorn
from pydantic_settings import CliApp

from .api import create_app
from .settings import Settings


def main(argv: list[str] | None = None) -> None:
    settings = CliApp.run(Settings, cli_args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
