"""Uploading, replacing, deleting and downloading adapters over HTTP; every bad upload is refused with a reason and
leaves the store exactly as it was."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import struct
import tarfile
import zipfile
from datetime import datetime
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from tests.conftest import LABELS
from tests.helpers import (
    ADMIN_TOKEN as TOKEN,
    UPLOAD_LIMITS as LIMITS,
    app_client,
    archive_bytes,
    folder_files,
    make_adapter,
    make_tiny_base,
    tree,
    upload,
    write_tiny_adapter,
)

@pytest.fixture
def refused(admin, store):
    """Upload, assert the status and every reason, and that neither the store nor the listing changed."""

    def check(name: str, files, status: int, *reasons: str, client: TestClient = admin) -> str:
        before, listed = tree(store), client.get("/adapters").json()
        response = upload(client, name, files)
        assert response.status_code == status, response.text
        detail = response.json()["detail"]
        for reason in reasons:
            assert reason in detail, detail
        assert tree(store) == before
        assert client.get("/adapters").json() == listed
        return detail

    return check


@pytest.fixture
def variant(adapter_store, tmp_path):
    """A copy of the good PEFT adapter gen-a with its config and/or tensors changed."""

    def make(config: dict | None = None, tensors=None, extra: dict[str, bytes] | None = None) -> Path:
        folder = tmp_path / f"variant-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(adapter_store / "gen-a", folder)
        if config is not None:
            path = folder / "adapter_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        if tensors is not None:
            weights = folder / "adapter_model.safetensors"
            save_file(tensors(load_file(str(weights))), str(weights))
        for file_name, content in (extra or {}).items():
            (folder / file_name).write_bytes(content)
        return folder

    return make


# ---- tokens -----------------------------------------------------------------------------------------------------


def test_write_routes_are_403_without_a_configured_token(client, adapter_store):
    response = upload(client, "new", folder_files(adapter_store / "gen-a"))
    assert response.status_code == 403
    assert "LORASWAP_ADMIN_TOKEN" in response.json()["detail"]
    assert client.delete("/adapters/gen-a").status_code == 403
    assert client.get("/adapters/gen-a").status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN])
def test_write_routes_are_401_with_a_wrong_token(tiny_settings, engine, store, adapter_store, header):
    with app_client(tiny_settings, engine, store) as client:
        headers = {"Authorization": header} if header else {}
        before = tree(store)
        response = client.post("/adapters", data={"name": "new"}, files=folder_files(adapter_store / "gen-a"),
                               headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "Bearer" in response.json()["detail"]
        assert client.delete("/adapters/sentiment", headers=headers).status_code == 401
        assert tree(store) == before


def test_every_write_operation_names_the_bearer_scheme_in_openapi_and_only_those_need_it(admin):
    """Swagger UI's Authorize button sends the token for the operations that name the scheme: all writes."""
    spec = admin.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    secured = {(method.upper(), path) for path, operations in spec["paths"].items()
               for method, operation in operations.items() if operation.get("security") == [{"adminToken": []}]}
    assert secured == {("POST", "/adapters"), ("DELETE", "/adapters/{name}"), ("POST", "/v1/files"),
                       ("DELETE", "/v1/files/{file_id}"), ("POST", "/v1/fine_tuning/jobs"),
                       ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel")}
    for method, path in secured:  # without the token each is refused before anything else is looked at
        response = admin.request(method, path.format(name="sentiment", file_id="file-x", job_id="ftjob-x"),
                                 headers={"Authorization": ""})
        assert response.status_code == 401, (method, path, response.text)


# ---- upload, replace, delete, download ---------------------------------------------------------------------------


def test_upload_returns_the_record_and_serves_on_the_next_request(admin, adapter_store):
    folder = adapter_store / "gen-b"
    weights = (folder / "adapter_model.safetensors").read_bytes()
    response = upload(admin, "fresh", folder_files(folder))
    assert response.status_code == 201, response.text
    record = response.json()
    created = record.pop("created")
    assert datetime.fromisoformat(created).tzinfo is not None
    assert record == {
        "name": "fresh", "version": 1, "task": "generation", "labels": None, "rank": 16, "alpha": 32.0,
        "target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"], "size_bytes": len(weights),
        "sha256": hashlib.sha256(weights).hexdigest(), "metrics": None, "dora": False, "loaded": False,
    }
    served = admin.post("/predict?adapter=fresh", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}})
    assert served.status_code == 200
    shown = admin.get("/adapters/fresh").json()
    assert shown == dict(record, created=created, loaded=True)
    assert [a["name"] for a in admin.get("/adapters").json()["adapters"]] == ["fresh", "sentiment"]


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
@pytest.mark.parametrize("top", [None, "my-adapter"])
def test_upload_an_archive(admin, adapter_store, kind, top):
    body = archive_bytes(adapter_store / "topic", kind, top)
    response = upload(admin, "topic2", [("adapter", (f"a.{kind}", body, "application/octet-stream"))])
    assert response.status_code == 201, response.text
    assert response.json()["labels"] == ["a", "b"] and response.json()["task"] == "classification"
    served = admin.post("/predict?adapter=topic2", json={"inputs": "some text"}).json()
    assert set(served["outputs"][0]["scores"]) == {"a", "b"}


def test_same_name_is_409_unless_replace_is_asked_for(admin, store, adapter_store):
    assert upload(admin, "twice", folder_files(adapter_store / "gen-a")).status_code == 201
    before = tree(store)
    again = upload(admin, "twice", folder_files(adapter_store / "gen-b"))
    assert again.status_code == 409
    assert "replace=true" in again.json()["detail"]
    assert tree(store) == before
    replaced = upload(admin, "twice", folder_files(adapter_store / "gen-b"), replace=True)
    assert replaced.status_code == 201
    assert (replaced.json()["version"], replaced.json()["rank"]) == (2, 16)
    assert admin.get("/adapters/twice").json()["version"] == 2
    # a shipped plain folder is replaced the same way
    shipped = upload(admin, "sentiment", folder_files(adapter_store / "topic"), replace=True)
    assert (shipped.json()["version"], shipped.json()["labels"]) == (2, ["a", "b"])


def test_a_name_held_by_a_skipped_folder_is_409(tiny_settings, engine, store, adapter_store):
    write_tiny_adapter(store / "broken", seed=1, hidden=32)  # does not fit the base: skipped at start
    with app_client(tiny_settings, engine, store) as client:
        before = tree(store)
        response = client.post("/adapters", data={"name": "broken", "replace": "true"},
                               files=folder_files(adapter_store / "gen-a"), headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 409
        assert "'broken' that is not a valid adapter" in response.json()["detail"]
        assert tree(store) == before


def test_a_name_taken_by_a_folder_written_after_start_is_409_saying_so(admin, store, adapter_store):
    """What `train-adapter --output adapters/NAME` did to a running server: the folder is not served (the store is
    read at start only) and blocks the upload of that name; the answer must say why."""
    shutil.copytree(adapter_store / "gen-a", store / "late")
    before = tree(store)
    response = upload(admin, "late", folder_files(adapter_store / "gen-a"))
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"the store holds a 'late' written after the server started: the store is read only at start, so it is not "
        f"served; remove it from {store} (or restart the server to serve it) first")
    assert tree(store) == before


def test_delete_unloads_and_frees_the_slot(admin, store, engine):
    files = folder_files(store / "sentiment")
    assert upload(admin, "doomed", files).status_code == 201
    assert admin.post("/predict?adapter=doomed", json={"inputs": "x"}).status_code == 200
    [slot] = [s for loc, s in engine.slots._slots.items() if loc.name == "doomed"]
    response = admin.delete("/adapters/doomed")
    assert response.status_code == 200
    assert response.json() == {"deleted": "doomed", "version": 1}
    assert not engine.is_loaded("doomed")
    assert slot.index in engine.slots._free
    assert all(slot.index not in layer.ranks for layer in engine.layers.values())
    assert slot.adapter.head is None
    assert not any("doomed" in path for path in tree(store))
    assert admin.get("/adapters/doomed").status_code == 404
    assert admin.post("/predict?adapter=doomed", json={"inputs": "x"}).status_code == 404
    assert admin.delete("/adapters/doomed").status_code == 404


def test_delete_a_plain_folder_of_the_store(admin, store):
    assert admin.delete("/adapters/sentiment").status_code == 200
    assert tree(store) == {}
    assert admin.get("/adapters").json()["adapters"] == []


def test_a_shipped_adapter_is_409_to_delete_and_a_replacement_of_it_is_deletable(
    tiny_settings, engine, tmp_path, adapter_store, monkeypatch
):
    package = tmp_path / "package"
    shutil.copytree(adapter_store / "gen-a", package / "shipped-gen")
    before = tree(package)
    monkeypatch.setattr("server.deps.SHIPPED_ADAPTERS", package)
    with app_client(tiny_settings, engine, tmp_path / "store") as admin:
        admin.headers["Authorization"] = f"Bearer {TOKEN}"
        refused = admin.delete("/adapters/shipped-gen")
        assert refused.status_code == 409
        assert refused.json()["detail"].startswith("adapter 'shipped-gen' is shipped with loraswap and cannot be "
                                                   "deleted")
        assert upload(admin, "shipped-gen", folder_files(adapter_store / "gen-b"), replace=True).json()["version"] == 2
        assert admin.delete("/adapters/shipped-gen").json()["version"] == 2
        assert admin.get("/adapters/shipped-gen").json()["version"] == 1  # the shipped one again
    assert tree(package) == before


def test_download_is_the_uploaded_adapter(admin, adapter_store):
    upload(admin, "fetch-me", folder_files(adapter_store / "gen-mlp"))
    response = admin.get("/adapters/fetch-me/download")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    assert 'filename="fetch-me-v1.zip"' in response.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(response.content)) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert files[f"fetch-me/{name}"] == (adapter_store / "gen-mlp" / name).read_bytes()
    assert json.loads(files["fetch-me/record.json"])["version"] == 1
    assert admin.get("/adapters/nope/download").status_code == 404


# ---- validation: each refused with 4xx and the reason ----------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", "..", "../x", "a/b", "a\\b", "/abs", "a..b", "Upper", "-x", ".hidden", "x" * 65, "ok\n", "é"]
)
def test_bad_names_are_422(refused, adapter_store, name):
    refused(name, folder_files(adapter_store / "gen-a"), 422, "name", "not a valid adapter name")


def test_a_missing_name_is_422(admin, adapter_store):
    response = admin.post("/adapters", files=folder_files(adapter_store / "gen-a"))
    assert response.status_code == 422 and "'name' is required" in response.json()["detail"]


def test_a_dora_config_without_magnitude_vectors_is_422(refused, variant):
    """DoRA adapters serve (tests/test_dora.py); one whose config says use_dora but lacks DoRA's tensors does not."""
    refused("dora", folder_files(variant(config={"use_dora": True})), 422,
            "use_dora=true but no lora_magnitude_vector")


@pytest.mark.parametrize("peft_type", ["LOHA", "IA3", "PREFIX_TUNING"])
def test_other_peft_methods_are_422(refused, variant, peft_type):
    refused("other", folder_files(variant(config={"peft_type": peft_type})), 422, peft_type, "only LORA")


class _Trap:
    """Unpickling this creates a marker file: proof that a pickle was opened."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("keep_safetensors", [True, False])
def test_pickled_weights_are_422_and_never_unpickled(refused, variant, tmp_path, keep_safetensors):
    trap = _Trap()
    trap.marker = tmp_path / "unpickled"
    folder = variant(extra={"adapter_model.bin": pickle.dumps(trap)})
    if not keep_safetensors:
        (folder / "adapter_model.safetensors").unlink()
    refused("pickled", folder_files(folder), 422, "pickled weights are never loaded", "adapter_model.bin")
    assert not trap.marker.exists()


def test_a_key_matching_no_module_is_422(refused, variant):
    def add_unknown(tensors):
        prefix = "base_model.model.model.layers.0.self_attn.nope_proj"
        return {**tensors, f"{prefix}.lora_A.weight": torch.ones(4, 64), f"{prefix}.lora_B.weight": torch.ones(64, 4)}

    refused("unknown", folder_files(variant(tensors=add_unknown)), 422,
            "'model.layers.0.self_attn.nope_proj' does not exist in the base model")


def test_a_key_that_is_not_lora_is_422(refused, variant):
    refused("stray", folder_files(variant(tensors=lambda t: {**t, "some.other.weight": torch.ones(2)})), 422,
            "'some.other.weight' is neither a LoRA A/B weight nor a classifier head")


def test_a_wrong_shape_is_422(refused, variant):
    def widen(tensors):
        key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
        return {**tensors, key: torch.ones(4, 65)}

    refused("shape", folder_files(variant(tensors=widen)), 422, "do not fit a 64->64 layer")


def test_an_adapter_for_another_base_size_is_422(refused, tmp_path, tokenizer):
    other_base = make_tiny_base(tmp_path / "other-base", tokenizer, hidden=32)
    adapter = make_adapter(other_base, tmp_path / "other-adapter")
    detail = refused("other-size", folder_files(adapter), 422, "a different base architecture or size")
    assert detail.count("do not fit") == 4  # q and v in both layers, every problem at once


def test_an_adapter_for_another_architecture_is_422(refused, variant):
    def gpt2(tensors):
        return {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.ones(4, 64),
                "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.ones(192, 4)}

    refused("gpt2", folder_files(variant(tensors=gpt2)), 422, "'transformer.h.0.attn.c_attn' does not exist")


def test_an_adapter_trained_on_another_base_fingerprint_is_422(refused, variant):
    metadata = json.dumps({"task": "generation", "base_model": {"name": "Other-7B", "fingerprint": "0123abcd"}})
    refused("elsewhere", folder_files(variant(extra={"loraswap.json": metadata.encode()})), 422,
            "trained on base 'Other-7B' (0123abcd)")


def test_an_adapter_that_changes_nothing_is_422(refused, variant):
    refused("empty", folder_files(variant(tensors=lambda t: {})), 422, "no LoRA weights found",
            "would change nothing")


def test_rank_over_the_maximum_is_422(refused, adapter_store, engine, monkeypatch):
    monkeypatch.setattr(engine, "max_rank", 8)
    refused("big", folder_files(adapter_store / "gen-b"), 422, "rank 16 exceeds the configured maximum of 8")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_is_422(refused, variant, bad):
    def poison(tensors):
        key = next(k for k in tensors if k.endswith("lora_B.weight"))
        tensors[key][0, 0] = bad
        return tensors

    refused("poisoned", folder_files(variant(tensors=poison)), 422, "holds NaN or Inf values")


def test_a_head_disagreeing_with_its_labels_is_422(refused, adapter_store, tmp_path):
    folder = tmp_path / "cls"
    shutil.copytree(adapter_store / "sentiment", folder)
    (folder / "loraswap.json").write_text(json.dumps({"task": "classification", "labels": ["yes", "no"]}))
    refused("labels", folder_files(folder), 422, "classification head has 3 outputs but 2 labels are given")


def test_a_safetensors_header_over_the_limit_is_422(refused, variant):
    folder = variant()
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(struct.pack("<Q", 17 * 1024**2) + weights.read_bytes()[8:])
    refused("header", folder_files(folder), 422, "header is 17825792 bytes, over the limit")


def test_a_truncated_safetensors_file_is_422(refused, variant):
    folder = variant()
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    refused("truncated", folder_files(folder), 422, "adapter_model.safetensors is truncated")


def test_a_file_name_with_a_path_is_422(refused, adapter_store):
    files = folder_files(adapter_store / "gen-a") + [("files", ("../escape.json", b"{}", "application/json"))]
    refused("escape", files, 422, "file name '../escape.json' is not allowed")


def test_missing_files_are_422(refused, adapter_store):
    files = [f for f in folder_files(adapter_store / "gen-a") if f[1][0] == "adapter_config.json"]
    refused("half", files, 422, "adapter_model.safetensors is missing")


# ---- size limits and hostile archives ----------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413(tiny_settings, engine, store, adapter_store, refused):
    with app_client(tiny_settings, engine, store, max_upload_bytes=4096) as small:
        small.headers["Authorization"] = f"Bearer {TOKEN}"
        refused("large", folder_files(adapter_store / "gen-b"), 413, "over the limit of 4096", client=small)


def test_a_streamed_body_over_the_limit_is_413_without_a_length(tiny_settings, engine, store):
    """Chunked transfer: no Content-Length to check up front, so the stream itself is cut off."""
    boundary = "xyz"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="adapter_model.safetensors"'
            "\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(100):
            yield b"\0" * 1024

    with app_client(tiny_settings, engine, store, max_upload_bytes=8192) as small:
        before = tree(store)
        response = small.post("/adapters", content=body(), headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert response.status_code == 413
        assert "over the limit of 8192 bytes" in response.json()["detail"]
        assert tree(store) == before


def _zip(members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return buffer.getvalue()


def _tar_gz(members: list[tarfile.TarInfo], data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for info in members:
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


def _tar_member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


def _zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16
    return info, target.encode()


@pytest.fixture
def good_members(adapter_store) -> list[tuple[str, bytes]]:
    folder = adapter_store / "gen-a"
    return [(p.name, p.read_bytes()) for p in sorted(folder.iterdir())]


def as_file(body: bytes, name: str = "adapter.zip"):
    return [("adapter", (name, body, "application/octet-stream"))]


@pytest.mark.parametrize(
    "member, reason",
    [
        (("/etc/adapter_config.json", b"{}"), "has an absolute path"),
        (("\\windows\\evil.json", b"{}"), "has an absolute path"),
        (("C:evil.json", b"{}"), "has an absolute path"),
        (("../adapter_config.json", b"{}"), "leaves the archive folder ('..')"),
        (("a/../../x.json", b"{}"), "leaves the archive folder ('..')"),
        (_zip_symlink("link.json", "/etc/passwd"), "is a symbolic link"),
        (("nested/deeper/x.json", b"{}"), "is in a nested folder"),
    ],
)
def test_hostile_zip_members_are_422(refused, good_members, member, reason):
    refused("hostile", as_file(_zip(good_members + [member])), 422, reason)


@pytest.mark.parametrize(
    "member, reason",
    [
        (_tar_member("/abs.json", size=2), "has an absolute path"),
        (_tar_member("../up.json", size=2), "leaves the archive folder ('..')"),
        (_tar_member("link.json", tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
        (_tar_member("hard.json", tarfile.LNKTYPE, link="adapter_config.json"), "is a link"),
        (_tar_member("fifo", tarfile.FIFOTYPE), "is not a regular file"),
    ],
)
def test_hostile_tar_members_are_422(refused, member, reason):
    refused("hostile", as_file(_tar_gz([member], b"{}"), "adapter.tar.gz"), 422, reason)


def test_too_many_members_are_422(refused, good_members):
    members = good_members + [(f"extra-{i}.txt", b"x") for i in range(LIMITS["max_archive_members"])]
    refused("crowded", as_file(_zip(members)), 422, "over the limit of 8")
    many = [_tar_member(f"f{i}.txt", size=2) for i in range(LIMITS["max_archive_members"] + 1)]
    refused("crowded", as_file(_tar_gz(many, b"{}"), "a.tar.gz"), 422, "more than 8 members")


def test_a_zip_bomb_is_422(refused, good_members):
    bomb = _zip(good_members + [("zeros.txt", b"\0" * (2 * 1024**2))])
    assert len(bomb) < 64 * 1024
    refused("bomb", as_file(bomb), 422, "unpacks to", "over the limit of 1048576")


def test_a_zip_lying_about_its_sizes_is_422(refused, good_members):
    """Declared sizes are small, the data is not: nothing unpacks past the declared size."""
    bomb = bytearray(_zip([("zeros.txt", b"\0" * (2 * 1024**2))]))
    local = bomb.index(b"PK\x03\x04")
    central = bomb.index(b"PK\x01\x02")
    struct.pack_into("<I", bomb, local + 22, 10)  # uncompressed size in the local header
    struct.pack_into("<I", bomb, central + 24, 10)  # ... and in the central directory
    refused("liar", as_file(bytes(bomb)), 422, "the archive cannot be read", "Bad CRC-32")


def test_a_tar_gz_bomb_is_422(refused):
    refused("bomb", as_file(_tar_gz([_tar_member("zeros.txt", size=2 * 1024**2)], b"\0" * (2 * 1024**2)),
                            "a.tar.gz"), 422, "over the limit of 1048576")


def test_a_broken_archive_is_422(refused):
    refused("broken", as_file(b"PK\x03\x04" + b"garbage" * 10), 422, "the archive cannot be read")


def test_every_problem_is_reported_at_once(refused, variant):
    folder = variant(config={"lora_bias": True, "peft_type": "LOHA"},
                     extra={"adapter_model.bin": b"not even a pickle"})
    refused("many", folder_files(folder), 422, "lora_bias", "LOHA", "pickled weights")


def test_labels_come_from_the_uploaded_metadata(admin, adapter_store):
    response = upload(admin, "sentiment-2", folder_files(adapter_store / "sentiment"))
    assert response.json()["labels"] == LABELS


# ---- malformed fields that must be named, never crash the check ----------------------------------------------


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"task_type": ["CAUSAL_LM"]}, "task_type ['CAUSAL_LM'] is not supported"),
        ({"alpha_pattern": {"q_proj(": 4}}, "alpha_pattern key 'q_proj(' is not a valid regular expression"),
        ({"alpha_pattern": ["q_proj"]}, "alpha_pattern must map module patterns to numbers"),
        ({"rank_pattern": {"q_proj": "big"}}, "rank_pattern must map module patterns to numbers"),
    ],
)
def test_malformed_config_fields_are_422(refused, variant, config, reason):
    refused("malformed", folder_files(variant(config=config)), 422, reason)


def test_id2label_with_keys_that_are_not_indices_is_422(refused, adapter_store, tmp_path):
    folder = tmp_path / "cls"
    shutil.copytree(adapter_store / "sentiment", folder)
    (folder / "loraswap.json").write_text(json.dumps({"task": "classification"}))
    (folder / "config.json").write_text(json.dumps({"id2label": {"first": "a", "second": "b", "third": "c"}}))
    refused("id2label", folder_files(folder), 422, "id2label keys must be label indices")


def test_a_rank_zero_pair_is_422(refused, variant):
    def empty_pair(tensors):
        prefix = next(k for k in tensors if k.endswith("q_proj.lora_A.weight")).removesuffix(".lora_A.weight")
        return {**tensors, f"{prefix}.lora_A.weight": torch.ones(0, 64), f"{prefix}.lora_B.weight": torch.ones(64, 0)}

    refused("rank0", folder_files(variant(tensors=empty_pair)), 422, "rank 0 (empty lora_A and lora_B)")


def test_a_safetensors_header_without_valid_offsets_is_422(refused, variant):
    folder = variant()
    header = json.dumps({"x.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": "nope"}}).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    refused("offsets", folder_files(folder), 422, "tensor 'x.lora_A.weight' has no valid data_offsets")


def test_an_encrypted_zip_member_is_422(refused, good_members):
    body = bytearray(_zip(good_members))
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # general purpose flag bit 0
        start = 0
        while (at := body.find(signature, start)) >= 0:
            body[at + flag_offset] |= 1
            start = at + 4
    refused("encrypted", as_file(bytes(body)), 422, "the archive cannot be read")


def test_a_corrupt_deflate_stream_is_422(refused, good_members):
    body = bytearray(_zip(good_members))
    name_len, extra_len = struct.unpack_from("<HH", body, 26)
    data = 30 + name_len + extra_len
    body[data : data + 16] = b"\xff" * 16  # the first member's compressed bytes
    refused("corrupt", as_file(bytes(body)), 422, "the archive cannot be read")


def test_openapi_describes_the_upload_form_and_a_client_built_from_it_uploads(admin, adapter_store):
    """What Swagger UI and generated clients do: read the multipart schema, send one part per field."""
    from server.routes_adapters import FORM_FIELDS

    operation = admin.get("/openapi.json").json()["paths"]["/adapters"]["post"]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(schema["properties"]) == FORM_FIELDS | {"files"} and schema["required"] == ["name", "files"]
    values = {"name": "from-schema", "replace": False, "files": sorted((adapter_store / "gen-a").iterdir())}
    data, files = {}, []
    for field, spec in schema["properties"].items():
        if spec["type"] == "array" and spec["items"] == {"type": "string", "format": "binary"}:
            files += [(field, (path.name, path.read_bytes(), "application/octet-stream")) for path in values[field]]
        elif spec["type"] == "boolean":
            data[field] = str(values[field]).lower()
        else:
            assert spec["type"] == "string"
            data[field] = values[field]
    created = admin.post("/adapters", data=data, files=files)
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "from-schema" and created.json()["task"] == "generation"
    answer = admin.post("/predict?adapter=from-schema", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    assert answer.status_code == 200 and answer.json()["outputs"][0]["tokens"] > 0
