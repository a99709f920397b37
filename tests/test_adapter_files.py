"""The two files of an adapter the console shows: its loraswap.json and its training.png; nothing else is served."""

from __future__ import annotations

import json

from server.settings import SHIPPED_ADAPTERS
from tests.helpers import folder_files, upload, write_tiny_adapter

SHIPPED_PLOT = SHIPPED_ADAPTERS / "spam" / "training.png"


def test_metadata_is_the_stored_loraswap_json(admin, store):
    response = admin.get("/adapters/sentiment/metadata")
    assert response.status_code == 200
    assert response.json() == json.loads((store / "sentiment" / "loraswap.json").read_text())


def test_an_uploaded_plot_is_served_byte_for_byte(admin, tmp_path):
    folder = write_tiny_adapter(tmp_path / "plotted", seed=1)
    (folder / "training.png").write_bytes(SHIPPED_PLOT.read_bytes())
    assert upload(admin, "plotted", folder_files(folder)).status_code == 201
    response = admin.get("/adapters/plotted/training.png")
    assert response.status_code == 200
    assert response.content == SHIPPED_PLOT.read_bytes()
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_missing_files_are_404_naming_what_is_missing(admin, tmp_path):
    assert upload(admin, "bare", folder_files(write_tiny_adapter(tmp_path / "bare", seed=2))).status_code == 201
    plot = admin.get("/adapters/bare/training.png")
    assert (plot.status_code, plot.json()) == (404, {"detail": "adapter 'bare' has no training.png"})
    metadata = admin.get("/adapters/bare/metadata")
    assert (metadata.status_code, metadata.json()) == (404, {"detail": "adapter 'bare' has no loraswap.json"})
    unknown = admin.get("/adapters/nope/training.png")
    assert unknown.status_code == 404 and "adapter 'nope' not found" in unknown.json()["detail"]


def test_no_other_file_of_an_adapter_is_served(admin):
    assert admin.get("/adapters/sentiment/training.png").status_code == 404  # this one has no plot
    for path in ("adapter_config.json", "adapter_model.safetensors", "loraswap.json", "record.json"):
        assert admin.get(f"/adapters/sentiment/{path}").status_code == 404, path
    assert admin.get("/adapters/sentiment/%2e%2e%2fsentiment%2fadapter_config.json").status_code == 404


def test_a_refused_upload_lists_its_problems(admin, tmp_path):
    folder = write_tiny_adapter(tmp_path / "broken", seed=3)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "weights.bin").write_bytes(b"pickle")
    response = upload(admin, "broken", folder_files(folder))
    assert response.status_code == 422
    assert response.json()["problems"] == [
        "pickled weights are never loaded (weights.bin); save with safetensors",
        "adapter_model.safetensors is missing",
    ]
    assert response.json()["detail"] == "invalid adapter: " + "; ".join(response.json()["problems"])
