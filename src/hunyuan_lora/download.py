"""The `download` stage: fetch the model from ModelScope, check it is complete, record what was fetched.

    make download CONFIG=configs/huanhuan.yaml
    python scripts/download.py --config configs/huanhuan.yaml --set model.revision=<tag>
    folder = download.run(config.load("configs/huanhuan.yaml"))   # from Python

One straight line:
  1. list the repo at `model.revision` (ModelScope HubApi: resolve the revision, list files with sizes)
  2. check free disk at `model.cache_dir` against the bytes still missing (before anything is written)
  3. fetch config.json alone and require `auto_map` (a native-only copy fails here, not after 160 GB)
  4. modelscope.snapshot_download -> <cache_dir>/<owner>/<name> (re-runs fetch only what is missing)
  5. verify: config.json `auto_map` and the code files it names, every shard of the index, the
     tokenizer files, and every size the server listed; every problem is named in one error
  6. write <model folder>/download.json (what was fetched, from which revision; `train` copies it)

modelscope talks to https://www.modelscope.cn unless MODELSCOPE_DOMAIN=host[:port] names a mirror
(the tests point it at a local HTTPS server, tests/modelscope_server.py).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_json
from .config import Config
from .errors import UserError
from .estimate import human_bytes
from .model_folder import PROVENANCE_FILE, no_auto_map_error, verify


@dataclass
class RepoListing:
    """What the server says about `model_id` at `revision`, before anything is downloaded."""

    endpoint: str
    revision: dict  # modelscope's revision detail: {"Revision": <branch/tag name>, "CreatedAt": ..., ...}
    branches: list[str]
    tags: list[str]
    files: dict[str, dict] | None  # path -> {"Size", "Sha256", "Revision" (commit), ...}; None: list unusable


def _model_folder(cache_dir: Path, model_id: str) -> Path:
    # snapshot_download stores <cache_dir>/<owner>/<name>, with "." in the name masked as "___".
    owner, name = model_id.split("/", 1)
    return cache_dir / owner / name.replace(".", "___")


def _temp_folder(cache_dir: Path, model_id: str) -> Path:
    from modelscope.hub.constants import TEMPORARY_FOLDER_NAME  # partial downloads live here

    owner, name = model_id.split("/", 1)
    return cache_dir / TEMPORARY_FOLDER_NAME / owner / name


# ---------------------------------------------------------------------------------------------
# 1. ask the server


def list_repo(model_id: str, revision: str) -> RepoListing:
    """Resolve `revision` and list the repo's files the way snapshot_download will (same HubApi calls)."""
    # modelscope is imported here, not at module level: it pulls in torch (~2 s) on import.
    import requests
    from modelscope.hub.api import HubApi
    from modelscope.hub.errors import NotExistError

    if model_id.count("/") != 1:
        raise UserError(
            f"model id '{model_id}' is not of the form owner/name",
            where="model.model_id",
            fix="use the ModelScope id, e.g. Tencent-Hunyuan/Hunyuan-A13B-Instruct",
        )
    api = HubApi()
    try:
        endpoint = api.get_endpoint_for_read(repo_id=model_id, repo_type="model")
    except requests.HTTPError as e:
        raise UserError(
            f"ModelScope has no model '{model_id}' ({e})",
            where="model.model_id",
            fix="check the id on modelscope.cn (it is case sensitive)",
        ) from e
    except requests.RequestException as e:
        raise UserError(
            f"cannot reach ModelScope to look up {model_id}: {e}",
            where="network",
            fix="check the network / proxy (or MODELSCOPE_DOMAIN if you use a mirror) and run again",
        ) from e
    try:
        branches, tags = api.get_model_branches_and_tags_details(model_id, endpoint=endpoint)
        branch_names = [b["Revision"] for b in branches or []]
        tag_names = [t["Revision"] for t in tags or []]
        detail = api.get_valid_revision_detail(model_id, revision=revision, endpoint=endpoint)
        if not detail:  # e.g. "master" asked for but the repo has no such branch
            raise NotExistError(revision)
    except NotExistError as e:
        raise UserError(
            f"{model_id} has no revision '{revision}' (branches: {', '.join(branch_names) or 'none'}; "
            f"tags: {', '.join(tag_names) or 'none'})",
            where="model.revision",
            fix="set model.revision to one of the branches or tags listed (modelscope 1.25.0 accepts a branch "
            "or tag name, not a commit id)",
        ) from e
    except requests.RequestException as e:
        raise UserError(
            f"cannot list the revisions of {model_id} at {endpoint}: {e}",
            where="network",
            fix="check the network and run again",
        ) from e
    try:
        raw = api.get_model_files(model_id, revision=detail["Revision"], recursive=True, endpoint=endpoint)
        files = {f["Path"]: f for f in raw if f["Type"] != "tree"}
        if not all(isinstance(f.get("Size"), int) for f in files.values()):
            raise KeyError("Size")
    except requests.RequestException as e:
        raise UserError(
            f"cannot list the files of {model_id}@{detail['Revision']} at {endpoint}: {e}",
            where="network",
            fix="check the network and run again",
        ) from e
    except (KeyError, TypeError) as e:
        # The API answered in a shape this code does not know: fall back to model.download_size_gb.
        print(
            f"warning: the file list of {model_id} has an unexpected shape ({e!r}); "
            "checking disk space against model.download_size_gb instead"
        )
        files = None
    return RepoListing(endpoint, detail, branch_names, tag_names, files)


# ---------------------------------------------------------------------------------------------
# 2. disk space


def bytes_missing(folder: Path, temp_folder: Path, files: dict[str, dict]) -> int:
    """Bytes still to fetch: files absent or of the wrong size, less what partial downloads already hold."""
    need = 0
    for path, meta in files.items():
        size = meta["Size"]
        done = folder / path
        if done.is_file() and done.stat().st_size == size:
            continue
        partial = temp_folder / path  # snapshot_download resumes these with a Range request
        have = partial.stat().st_size if partial.is_file() else 0
        need += size - have if have <= size else size
    return need


def _bytes_on_disk(*folders: Path) -> int:
    return sum(p.stat().st_size for d in folders if d.is_dir() for p in d.rglob("*") if p.is_file())


def check_disk(cfg: Config, listing: RepoListing | None) -> int:
    """Raise before any download when `model.cache_dir` cannot hold what is still missing; return that size."""
    cache_dir = Path(cfg.model.cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the download folder {cache_dir}: {e}",
            where="model.cache_dir",
            fix="set model.cache_dir to a writable folder",
        ) from e
    folder, temp = _model_folder(cache_dir, cfg.model.model_id), _temp_folder(cache_dir, cfg.model.model_id)
    if listing is not None and listing.files is not None:
        need = bytes_missing(folder, temp, listing.files)
        basis = f"the files of {cfg.model.model_id}@{listing.revision['Revision']} still missing"
    else:
        need = max(0, int(cfg.model.download_size_gb * 1e9) - _bytes_on_disk(folder, temp))
        basis = f"model.download_size_gb = {cfg.model.download_size_gb:g} less what is already there"
    free = shutil.disk_usage(cache_dir).free
    if free < need:
        raise UserError(
            f"not enough free disk space: {human_bytes(free)} free at {cache_dir.resolve()}, "
            f"{human_bytes(need)} needed ({basis})",
            where="model.cache_dir",
            fix="free some space, or download to a bigger disk: --set model.cache_dir=<dir> --model-dir "
            f"<dir>/{cfg.model.model_id} (on AutoDL the data disk: model.cache_dir=/root/autodl-tmp, "
            f"MODEL_DIR=/root/autodl-tmp/{cfg.model.model_id})",
        )
    return need


# ---------------------------------------------------------------------------------------------
# 3. the remote-code format, checked on config.json before the weights


def check_remote_code_format(cfg: Config, listing: RepoListing) -> None:
    """Fetch only config.json (into the same cache, so the snapshot will not fetch it again) and require auto_map."""
    from modelscope.hub.file_download import model_file_download

    if listing.files is not None and "config.json" not in listing.files:
        return  # verify() names it as missing
    try:
        path = Path(
            model_file_download(
                cfg.model.model_id, "config.json", revision=cfg.model.revision, cache_dir=str(cfg.model.cache_dir)
            )
        )
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # requests' errors are OSErrors; a broken JSON a ValueError
        print(f"warning: could not check config.json before the download ({e}); checking it afterwards")
        return
    if not config.get("auto_map"):
        raise no_auto_map_error(path, config, listing)


# ---------------------------------------------------------------------------------------------
# 6. provenance


def write_provenance(folder: Path, cfg: Config, listing: RepoListing) -> Path:
    """<folder>/download.json, written atomically: what was fetched, from which revision, when."""
    import modelscope

    files = listing.files
    if files is None:  # no usable listing: record what is on disk
        files = {
            p.relative_to(folder).as_posix(): {"Size": p.stat().st_size}
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name != PROVENANCE_FILE
        }
    # modelscope 1.25.0 resolves a revision to a branch/tag *name* (no commit id); the listing gives
    # each file's last commit, and the newest of those is the commit the downloaded tree matches.
    newest = max(files.values(), key=lambda f: f.get("CommittedDate") or 0, default={})
    record = {
        "model_id": cfg.model.model_id,
        "revision_requested": cfg.model.revision,
        "revision_resolved": listing.revision.get("Revision"),
        "revision_created_at": listing.revision.get("CreatedAt"),
        "commit": newest.get("Revision"),
        "endpoint": listing.endpoint,
        "modelscope_version": modelscope.__version__,
        "downloaded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "folder": str(folder.resolve()),
        "total_bytes": sum(f["Size"] for f in files.values()),
        # sha256 as listed by the server; modelscope checked each file it fetched against it.
        "files": [
            {"path": p, "size": f["Size"], "sha256": f.get("Sha256"), "commit": f.get("Revision")}
            for p, f in sorted(files.items())
        ],
    }
    out = write_json(folder / PROVENANCE_FILE, record)
    return out


# ---------------------------------------------------------------------------------------------
# the stage


def _incomplete(folder: Path, files: dict[str, dict] | None) -> list[str]:
    return [
        p
        for p, m in sorted((files or {}).items())
        if not (folder / p).is_file() or (folder / p).stat().st_size != m["Size"]
    ]


def _leave_on_ctrl_c(signum, frame) -> None:
    # modelscope fetches in worker threads, which a KeyboardInterrupt would wait for (a stalled transfer:
    # forever), so leave at once: finished and partial files stay where the rerun resumes them.
    os.write(2, b"\ndownload interrupted: the finished files are kept; `make download` fetches only the rest\n")
    os._exit(128 + signum)


def run(cfg: Config) -> Path:
    """Download `cfg.model.model_id` at `cfg.model.revision` into `cfg.model.cache_dir`; return the folder."""
    from modelscope import snapshot_download
    from modelscope.hub.errors import FileDownloadError, FileIntegrityError
    from urllib3.exceptions import HTTPError as Urllib3Error

    m = cfg.model
    cache_dir = Path(m.cache_dir)
    expected = _model_folder(cache_dir, m.model_id)

    # -- 1, 2: what is there to fetch, and does it fit
    listing = list_repo(m.model_id, m.revision)
    need = check_disk(cfg, listing)
    print(
        f"downloading {m.model_id}@{listing.revision['Revision']} from {listing.endpoint} into {expected} "
        f"({human_bytes(need)} to fetch)"
    )

    # -- 3: a native-only copy (no auto_map) cannot load on the pinned stack: stop before the weights
    check_remote_code_format(cfg, listing)

    # -- 4: download (modelscope's progress bars; finished files are skipped on a re-run; Ctrl-C: one line)
    previous = signal.signal(signal.SIGINT, _leave_on_ctrl_c)
    try:
        folder = Path(snapshot_download(m.model_id, revision=m.revision, cache_dir=str(cache_dir)))
    except (FileIntegrityError, FileDownloadError, OSError, Urllib3Error) as e:
        # OSError covers requests' exceptions and a full disk.
        temp = _temp_folder(cache_dir, m.model_id)
        corrupt = [os.path.relpath(p, temp) for p in re.findall(r"File (.+?) integrity check failed", str(e))]
        detail = (
            f"the content of {', '.join(corrupt)} does not match the sha256 the server lists"
            if corrupt
            else f"{type(e).__name__}: {e}"
        )
        missing = _incomplete(expected, listing.files)
        raise UserError(
            f"downloading {m.model_id}@{listing.revision['Revision']} failed: {detail}"
            + (f"; not complete: {', '.join(missing)}" if missing else ""),
            where=str(expected),
            fix="run `make download` again: modelscope keeps the finished files and resumes the rest; if the "
            "same file fails again the server's copy does not match its listing (try later or pin another "
            "model.revision); a full disk needs another model.cache_dir",
        ) from e
    finally:
        signal.signal(signal.SIGINT, previous)

    # -- 5, 6: check it, record it
    verify(folder, listing.files)
    out = write_provenance(folder, cfg, listing)
    print(f"verified {len(listing.files or {})} files; provenance in {out}")

    if folder.resolve() != Path(m.dir).resolve():
        print(
            f"NOTE: the model is in {folder}, but model.dir is {m.dir}: pass MODEL_DIR={folder} to the "
            f"later stages (or set model.dir: {folder} in the config)"
        )
    return folder
