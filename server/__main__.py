"""`loraswap` command: serve the app with settings from env vars (LORASWAP_*) and CLI flags."""

from __future__ import annotations

from . import openmp

openmp.configure()  # before anything imports torch

import uvicorn  # noqa: E402
from pydantic_settings import CliApp  # noqa: E402

from .api import create_app  # noqa: E402
from .lifecycle import DrainingServer  # noqa: E402
from .logging_setup import configure_logging  # noqa: E402
from .settings import Settings  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    settings = CliApp.run(Settings, cli_args=argv)
    configure_logging(settings.log_format)
    if settings.replicas > 1:
        from .cluster import serve_cluster  # Ray only where it is asked for

        serve_cluster(settings)
        return
    app = create_app(settings)
    # our middleware logs every request (server/telemetry.py): no uvicorn access log, and no uvicorn log config,
    # so its own lines go through our handler and format too. SIGTERM drains first (server/lifecycle.py); by then
    # nothing is in flight, so uvicorn's own graceful wait is short.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    services = app.state.services
    DrainingServer(config, services.lifecycle, settings.drain_timeout_s, services.stop_engine).run()


if __name__ == "__main__":
    main()
