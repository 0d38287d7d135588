"""The download stage against a real local HTTPS server speaking modelscope 1.25.0's API.

    .venv/bin/pytest tests/test_download.py

Nothing leaves 127.0.0.1: MODELSCOPE_DOMAIN points modelscope at tests/modelscope_server.py, whose
certificate comes from a throwaway CA that REQUESTS_CA_BUNDLE makes the client trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from modelscope_server import ModelScopeServer

from hunyuan_lora import config, download, model_folder
from hunyuan_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "Tencent-Hunyuan/Hunyuan-A13B-Instruct"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
SHARD1_SIZE = 2_621_440  # > modelscope's 1 MiB read chunk, so a cut transfer can resume mid-file


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def ms_env(tmp_path, monkeypatch) -> dict[str, str]:
    """Keep modelscope inside tmp_path: its cache, its ~/.modelscope session file, no proxy."""
    from modelscope.hub.api import ModelScopeConfig

    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope-cache"))
    monkeypatch.setattr(ModelScopeConfig, "path_credential", str(tmp_path / "modelscope-credentials"))
    for var in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "MODELSCOPE_SDK_DEBUG",
        "MODELSCOPE_DOMAIN",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return os.environ


@pytest.fixture
def modelscope_server(ms_env, monkeypatch):
    """start(folder, **faults) -> a running ModelScopeServer the client is pointed at; stopped at teardown."""
    servers: list[ModelScopeServer] = []

    def start(folder: Path, **faults) -> ModelScopeServer:
        srv = ModelScopeServer(folder, model_id=MODEL_ID, **faults).start()
        servers.append(srv)
        monkeypatch.setenv("MODELSCOPE_DOMAIN", srv.domain)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", srv.ca_file)
        monkeypatch.setenv("SSL_CERT_FILE", srv.ca_file)
        return srv

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
def fake_model(tmp_path) -> Path:
    """A small folder with the real download's file names: 2 shards + index, code, tokenizer files."""
    d = tmp_path / "fake-model"
    d.mkdir()
    rng = random.Random(0)
    files = {
        "config.json": json.dumps(
            {
                "model_type": "hunyuan",
                "auto_map": {
                    "AutoConfig": "configuration_hunyuan.HunYuanConfig",
                    "AutoModel": "hunyuan.HunYuanModel",
                    "AutoModelForCausalLM": "hunyuan.HunYuanMoEV1ForCausalLM",
                },
            }
        ).encode(),
        "configuration_hunyuan.py": b"class HunYuanConfig: pass\n",
        "hunyuan.py": b"from .configuration_hunyuan import HunYuanConfig\n"
        b"from .modeling_hunyuan import HunYuanDecoderLayer\n",
        "modeling_hunyuan.py": b"class HunYuanDecoderLayer: pass\n",
        "tokenization_hy.py": b"VOCAB_FILES_NAMES = {'vocab_file': 'hy.tiktoken'}\n",
        "tokenizer_config.json": json.dumps(
            {"auto_map": {"AutoTokenizer": ["tokenization_hy.HYTokenizer", None]}}
        ).encode(),
        "hy.tiktoken": b"IQ== 0\nIg== 1\n",
        "generation_config.json": b'{"eos_token_id": [127960, 127967]}',
        SHARD1: rng.randbytes(SHARD1_SIZE),
        SHARD2: rng.randbytes(3000),
        "model.safetensors.index.json": json.dumps(
            {
                "metadata": {"total_size": SHARD1_SIZE + 3000},
                "weight_map": {"model.embed_tokens.weight": SHARD1, "model.norm.weight": SHARD2},
            }
        ).encode(),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def make_cfg(tmp_path: Path, **model) -> config.Config:
    """A config that downloads into tmp_path/cache (model.dir = where snapshot_download puts it)."""
    model = {"cache_dir": str(tmp_path / "cache"), "dir": str(tmp_path / "cache" / MODEL_ID), **model}
    return config.load(overrides=[f"model.{k}={v}" for k, v in model.items()])


def model_files(folder: Path) -> dict[str, bytes]:
    """The model's own files in a folder (not modelscope's .msc/.mv/.mdl, not download.json)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and p.name != model_folder.PROVENANCE_FILE
    }


# ---------------------------------------------------------------------------------------------
# (a) the whole stand-in folder, byte for byte, with its provenance


def test_download_stand_in_is_byte_identical_and_recorded(stand_in_dir, modelscope_server, tmp_path, capsys):
    srv = modelscope_server(stand_in_dir)
    cfg = make_cfg(tmp_path, revision="v1.0.0")

    folder = download.run(cfg)

    assert folder == tmp_path / "cache" / MODEL_ID
    source = model_files(stand_in_dir)
    assert SHARD1 in source
    assert "hy.tiktoken" in source
    assert model_files(folder) == source
    assert sorted(r.file for r in srv.file_requests()) == sorted(source)  # each file fetched once
    assert all(r.query["Revision"] == "v1.0.0" for r in srv.file_requests())

    record = json.loads((folder / "download.json").read_text())
    assert record["model_id"] == MODEL_ID
    assert record["revision_requested"] == record["revision_resolved"] == "v1.0.0"
    assert record["commit"] == srv.commit("v1.0.0") != srv.commit("master")
    assert record["endpoint"] == f"https://{srv.domain}"
    assert record["modelscope_version"] == "1.25.0"
    assert record["files"] == [
        {"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest(), "commit": srv.commit("v1.0.0")}
        for p, b in sorted(source.items())
    ]
    assert record["total_bytes"] == sum(len(b) for b in source.values())
    assert "MODEL_DIR" not in capsys.readouterr().out  # model.dir already is the download folder
    assert srv.errors == []

    # A second run fetches nothing, re-verifies and rewrites the provenance.
    n = len(srv.file_requests())
    assert download.run(cfg) == folder
    assert len(srv.file_requests()) == n
    assert not list(folder.glob(".download.json.*"))  # no temp file left by the atomic write


def test_download_tells_to_set_model_dir_when_it_differs(fake_model, modelscope_server, tmp_path, capsys):
    modelscope_server(fake_model)
    folder = download.run(make_cfg(tmp_path, dir=str(tmp_path / "elsewhere")))
    assert f"MODEL_DIR={folder}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# (b) a native-only copy (no auto_map)


def test_config_without_auto_map_asks_for_another_revision(fake_model, modelscope_server, tmp_path):
    srv = modelscope_server(fake_model, strip_auto_map=True)
    with pytest.raises(UserError) as e:
        download.run(make_cfg(tmp_path))
    assert e.value.where == "model.revision"
    assert "auto_map" in e.value.what
    assert "4.51.3" in e.value.what
    assert "model.revision" in e.value.fix
    assert "tags: v1.0.0" in e.value.fix
    assert [r.file for r in srv.file_requests()] == ["config.json"]  # stopped before the weights
    assert not (tmp_path / "cache" / MODEL_ID / "download.json").exists()


def test_verify_rejects_a_downloaded_config_without_auto_map(stand_in_dir, tmp_path):
    # The same check after the download (the branch may move between config.json and the snapshot).
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(stand_in_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        model_folder.verify(folder, None)
    assert e.value.where == "model.revision"
    assert "auto_map" in e.value.what


# ---------------------------------------------------------------------------------------------
# (c) not enough disk: refused before any file is written


def no_files_under(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.is_file()]


def test_not_enough_disk_from_the_server_listing(fake_model, modelscope_server, tmp_path):
    srv = modelscope_server(fake_model, listed_size={SHARD1: 10**18})  # an exabyte shard
    with pytest.raises(UserError) as e:
        download.run(make_cfg(tmp_path))
    assert e.value.where == "model.cache_dir"
    assert "free" in e.value.what
    assert "1000000000.0 GB needed" in e.value.what
    assert "/root/autodl-tmp" in e.value.fix
    assert srv.file_requests() == []
    assert no_files_under(tmp_path / "cache")


def test_not_enough_disk_falls_back_to_download_size_gb(fake_model, modelscope_server, tmp_path, capsys):
    srv = modelscope_server(fake_model, broken_file_list=True)  # no sizes to sum
    with pytest.raises(UserError) as e:
        download.run(make_cfg(tmp_path, download_size_gb=1e9))
    assert e.value.where == "model.cache_dir"
    assert "download_size_gb" in e.value.what
    assert "unexpected shape" in capsys.readouterr().out
    assert srv.file_requests() == []
    assert no_files_under(tmp_path / "cache")


def test_disk_need_counts_only_what_is_missing(tmp_path):
    folder, temp = tmp_path / "m", tmp_path / "t"
    folder.mkdir(), temp.mkdir()
    (folder / "done.bin").write_bytes(b"x" * 100)  # complete
    (folder / "stale.bin").write_bytes(b"x" * 7)  # wrong size: fetched again in full
    (temp / "partial.bin").write_bytes(b"x" * 40)  # resumed from byte 40
    files = {
        "done.bin": {"Size": 100},
        "stale.bin": {"Size": 50},
        "partial.bin": {"Size": 90},
        "new.bin": {"Size": 1000},
    }
    assert download.bytes_missing(folder, temp, files) == 50 + 50 + 1000


# ---------------------------------------------------------------------------------------------
# (d) a transfer cut in the middle


def test_cut_transfer_is_resumed_and_ends_complete(fake_model, modelscope_server, tmp_path):
    cut = 1_500_000
    srv = modelscope_server(fake_model, cut_after={SHARD1: cut})

    folder = download.run(make_cfg(tmp_path))

    assert model_files(folder) == model_files(fake_model)
    first, second = srv.file_requests(SHARD1)  # exactly two transfers of the cut file
    assert first.cut
    assert first.body_bytes == cut
    # modelscope keeps the bytes it wrote (whole 1 MiB chunks) and asks for the rest with Range.
    start = int(re.fullmatch(r"bytes=(\d+)-(\d+)", second.range)[1])
    assert second.range == f"bytes={start}-{SHARD1_SIZE - 1}"
    assert 0 <= start <= cut
    assert second.status == 206
    assert second.body_bytes == SHARD1_SIZE - start
    others = [r.file for r in srv.file_requests() if r.file != SHARD1]
    assert sorted(others) == sorted(set(model_files(fake_model)) - {SHARD1})  # nothing else refetched
    assert json.loads((folder / "download.json").read_text())["revision_resolved"] == "master"


# ---------------------------------------------------------------------------------------------
# (e) content that does not match the listing


def test_wrong_content_is_reported_by_name(fake_model, modelscope_server, tmp_path):
    good = (fake_model / SHARD2).read_bytes()
    modelscope_server(fake_model, wrong_content={SHARD2: bytes(len(good))})  # same size, other bytes
    with pytest.raises(UserError) as e:
        download.run(make_cfg(tmp_path))
    assert f"the content of {SHARD2} does not match the sha256" in e.value.what
    assert "not complete: " + SHARD2 in e.value.what  # modelscope deleted it; nothing else is missing
    assert "make download" in e.value.fix
    assert (tmp_path / "cache" / MODEL_ID / SHARD1).read_bytes() == (fake_model / SHARD1).read_bytes()


def test_wrong_size_without_sha256_is_caught_by_the_size_check(fake_model, modelscope_server, tmp_path):
    # Without a Sha256 in the listing modelscope checks nothing: the stage's own size check must.
    modelscope_server(fake_model, wrong_content={SHARD2: b"truncated"}, omit_sha256=True)
    with pytest.raises(UserError) as e:
        download.run(make_cfg(tmp_path))
    assert e.value.where == "model.dir"
    assert f"{SHARD2} has 9 bytes, the server lists 3000" in e.value.what
    assert SHARD1 not in e.value.what


# ---------------------------------------------------------------------------------------------
# (f) the index names a shard the download lacks


def test_shard_named_in_index_but_missing(fake_model, modelscope_server, tmp_path):
    srv = modelscope_server(fake_model, hidden={SHARD2})
    with pytest.raises(UserError) as e:
        download.run(make_cfg(tmp_path))
    assert e.value.where == "model.dir"
    assert (
        f"{SHARD2} (named in model.safetensors.index.json) is missing and the server does not list it" in e.value.what
    )
    assert SHARD1 not in e.value.what
    assert SHARD2 not in {r.file for r in srv.file_requests()}


def test_verify_follows_relative_imports_of_the_auto_map_code(stand_in_dir, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(stand_in_dir, folder)
    (folder / "modeling_hunyuan.py").unlink()  # imported by hunyuan.py, not named in auto_map
    (folder / "hy.tiktoken").unlink()
    with pytest.raises(UserError) as e:
        model_folder.verify(folder, None)
    assert "modeling_hunyuan.py" in e.value.what
    assert "hy.tiktoken" in e.value.what
    reported = set(re.findall(r"([\w.-]+) (?:\(|is missing)", e.value.what))
    assert reported == {"modeling_hunyuan.py", "hy.tiktoken"}  # and nothing that is present


# ---------------------------------------------------------------------------------------------
# (g) the script: exit code 2 and one paragraph


def test_script_reports_a_bad_revision_in_one_paragraph(fake_model, modelscope_server, tmp_path):
    modelscope_server(fake_model)
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # the child's ~/.modelscope stays in tmp_path
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "download.py"),
            "--set",
            f"model.cache_dir={tmp_path / 'cache'}",
            "--set",
            "model.revision=no-such-tag",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    paragraph = proc.stderr[proc.stderr.index("error: ") :].strip()
    assert proc.stderr.count("error: ") == 1
    assert "\n\n" not in paragraph
    assert "model.revision" in paragraph
    assert "no-such-tag" in paragraph
    assert "v1.0.0" in paragraph
    assert no_files_under(tmp_path / "cache")
