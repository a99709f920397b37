"""The local engine and the Ray ingress's proxy both implement EngineAPI, the only engine the routes know."""

from __future__ import annotations

import inspect

import pytest

from server.engine_api import EngineAPI

METHODS = sorted(name for name, value in vars(EngineAPI).items() if inspect.isfunction(value) and name[0] != "_")
ATTRIBUTES = sorted(EngineAPI.__annotations__)


def conforms(engine: object) -> list[str]:
    """What of EngineAPI this object lacks, or has with other parameters."""
    problems = [name for name in ATTRIBUTES if not hasattr(engine, name)]
    for name in METHODS:
        method = getattr(engine, name, None)
        wanted = list(inspect.signature(getattr(EngineAPI, name)).parameters)[1:]  # without self
        if method is None or list(inspect.signature(method).parameters) != wanted:
            problems.append(name)
    return problems


def test_the_local_engine_implements_it(engine):
    assert METHODS and ATTRIBUTES
    assert conforms(engine) == []


def test_the_cluster_proxy_implements_it(engine):
    pytest.importorskip("ray")
    from server.cluster import RemoteEngine

    assert conforms(RemoteEngine(None, engine.info, engine.tokenizer)) == []
