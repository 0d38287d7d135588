"""The NF4 model (model.quantization: nf4), built one decoder layer at a time, and its cache.

    model, how = nf4.load(model_dir, lm_cls, config, device, dtype, scale.bnb_config(cfg), cache=nf4.cache_dir(...))

From the checkpoint: the model is created empty (meta tensors), then each decoder layer in turn
reads its tensors from the shards, has its Linear weights quantised to bitsandbytes NF4 on the
device (scale.bnb_config's settings, as transformers applies them; blocksize 64), its routed experts' codes
and block scales packed per projection (fast_moe.NF4Experts), and is complete before the next one
is read. The peak is the model so far plus one layer in bf16. transformers' own NF4 load first
allocates one byte per parameter of the whole model at once (its `caching_allocator_warmup`, with
a factor meant for 8-bit: twice the NF4 model), which is where its peak of ~2.3 GiB per layer came from.

The cache (model.nf4_cache) is that quantised, packed model on disk: one safetensors file per
decoder layer plus one for the rest, ~45 GB for the real model instead of 160 GB, read straight
into place with no quantisation. `cache.json` records what made it (the key: the shards' index, sizes
and modification times, PACKING_VERSION, the bitsandbytes version, the quantisation settings and skip
list, the dtype) and each
file's size; a cache whose key differs, or with a missing, cut or unreadable file, is rebuilt, with a
line saying why. It is written into a temporary sibling folder while the checkpoint loads and renamed
into place only when complete: a load killed mid-write leaves nothing that would be used.

A layer file holds, per quantised Linear group (the E routed experts of one projection, packed as
fast_moe.NF4Experts holds them; any other Linear as a group of one):
    <group>.codes    (E * out * in / 2, 1) uint8    the 4-bit codes, expert after expert
    <group>.absmax   (E, blocks) uint8               block scales, themselves quantised (float32 if not)
    <group>.absmax2  (E, blocks2) float32            their second-level scales
    <group>.offset   (E,) float32                    the mean each expert's block scales were centred on
where <group> is e.g. `model.layers.N.mlp.experts.gate_proj` for experts and the module's own path
otherwise; `nf4.code` / `nf4.code2` hold the two lookup tables, and every unquantised tensor of the
layer (router, norms) is kept under its checkpoint name, in the checkpoint's dtype (cast on reading
as from_pretrained casts it, so the cache does not depend on the model code's `_keep_in_fp32_modules`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import honour_umask, publish_dir, write_json
from .errors import UserError
from .model_folder import INDEX_FILE, SINGLE_WEIGHTS_FILE, safetensors_header

PACKING_VERSION = 1  # raise when the cache's layout or what is packed in it changes
CACHE_INFO = "cache.json"
OUTER_FILE = "outer.safetensors"  # everything outside the decoder layers: embedding (= tied head), final norm
EXPERT = re.compile(r"^(?P<moe>.*\.experts)\.(?P<index>\d+)\.(?P<proj>\w+)$")
BLOCKSIZE, BLOCKSIZE2 = 64, 256  # bitsandbytes' 4-bit blocks and its second-level blocks of block scales


def layer_file(i: int) -> str:
    return f"layer-{i:03d}.safetensors"


# ---------------------------------------------------------------------------------------------
# where the cache is, what made it, whether it can be used


def cache_dir(setting: str, model_dir: str | Path) -> Path | None:
    """model.nf4_cache: "auto" -> `<model folder>.nf4-cache` beside the model folder (same disk); "none" -> None."""
    if setting == "none":
        return None
    if setting == "auto":
        folder = Path(model_dir).resolve()
        return folder.with_name(folder.name + ".nf4-cache")
    return Path(setting)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The index (if any) and every weights file."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [index] + [model_dir / s for s in shards]
    return [model_dir / SINGLE_WEIGHTS_FILE]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cache_key(model_dir: Path, dtype: torch.dtype, quant) -> dict:
    """What a cache is made from (quant: the BitsAndBytesConfig); used only when its key equals the current one."""
    from importlib import metadata

    files = {p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in checkpoint_files(model_dir)}
    index = model_dir / INDEX_FILE
    return {
        "packing_version": PACKING_VERSION,
        "bitsandbytes": metadata.version("bitsandbytes"),
        "skip": sorted(quant.llm_int8_skip_modules),
        "dtype": _name(dtype),
        "quantization": {
            "type": quant.bnb_4bit_quant_type,
            "blocksize": BLOCKSIZE,
            "double_quant": quant.bnb_4bit_use_double_quant,
            "compute_dtype": _name(quant.bnb_4bit_compute_dtype),
        },
        "index_sha256": hashlib.sha256(index.read_bytes()).hexdigest() if index.is_file() else None,
        "files": files,
    }


def _differences(old: dict, new: dict) -> str:
    out = []
    for k in sorted(set(old) | set(new)):
        if k == "files" and isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
            changed = sorted(n for n in set(old[k]) | set(new[k]) if old[k].get(n) != new[k].get(n))
            if changed:
                out.append(f"{', '.join(changed[:2])}{' ...' if len(changed) > 2 else ''} changed")
        elif old.get(k) != new.get(k):
            out.append(f"{k} {old.get(k)!r} -> {new.get(k)!r}")
    return "; ".join(out) or "its key differs"


# the files a cache write makes (cache.json through atomic.write_json's temporary name first)
CACHE_NAME = re.compile(
    rf"^(\.?{re.escape(CACHE_INFO)}(\.tmp-\w+)?|{re.escape(OUTER_FILE)}"
    rf"|layer-\d{{3}}\.safetensors)$"
)


def foreign_files(folder: Path) -> list[str]:
    """What in `folder` no cache write made (a folder holding any is never deleted or replaced)."""
    if folder.is_symlink() or not folder.is_dir():
        return [folder.name]
    return sorted(p.name for p in folder.iterdir() if not (p.is_file() and CACHE_NAME.match(p.name)))


def refuse_foreign(root: Path) -> None:
    """UserError when model.nf4_cache names a file or a folder holding anything but an NF4 cache."""
    if root.exists() or root.is_symlink():
        foreign = foreign_files(root)
        if foreign:
            raise UserError(
                f"model.nf4_cache is {root}, which holds what no NF4 cache write made "
                f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); the kit deletes and "
                "rewrites that folder, so it leaves it alone",
                where="model.nf4_cache",
                fix="name a folder of its own, e.g. <that folder>/hunyuan-nf4-cache, or keep the default "
                "(auto: beside the model folder)",
            )


def cache_state(root: Path | None, key: dict | None) -> tuple[str, str]:
    """("none" | "missing" | "stale" | "damaged" | "valid", one line saying so). Reads file headers only;
    UserError when the folder is not a cache (refuse_foreign)."""
    if root is None:
        return "none", "model.nf4_cache is none: every NF4 load quantises the checkpoint"
    if not root.exists():
        return "missing", f"no NF4 cache at {root} yet"
    refuse_foreign(root)
    try:
        info = json.loads((root / CACHE_INFO).read_text(encoding="utf-8"))
        sizes = dict(info["sizes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return "damaged", f"the NF4 cache at {root} has no readable {CACHE_INFO} ({type(e).__name__})"
    if info.get("key") != key:
        differences = _differences(info.get("key") or {}, key or {})
        return "stale", f"the NF4 cache at {root} was made from other inputs ({differences})"
    for name in [OUTER_FILE] + [layer_file(i) for i in range(info.get("layers", -1))]:
        if name not in sizes:
            return "damaged", f"the NF4 cache at {root} does not list {name}"
    for name, size in sizes.items():
        path = root / name
        if not path.is_file():
            return "damaged", f"the NF4 cache at {root} lacks {name}"
        if path.stat().st_size != size:
            return "damaged", f"the NF4 cache at {root} has {name} at {path.stat().st_size:,} bytes, not {size:,}"
        try:
            safetensors_header(path)
        except Exception as e:
            return "damaged", f"the NF4 cache at {root} has an unreadable {name} ({type(e).__name__})"
    return "valid", f"NF4 cache at {root} ({sum(sizes.values()) / 1e9:.1f} GB) matches the checkpoint"


def leftovers(root: Path) -> list[Path]:
    """What killed or interrupted cache writes leave beside it: `.<name>-*` temporary folders, `<name>.old`."""
    if not root.parent.is_dir():
        return []
    old = root.with_name(root.name + ".old")
    return sorted(root.parent.glob(f".{root.name}-*")) + ([old] if old.exists() else [])


def cache_bytes(root: Path | None) -> int:
    """Disk space the cache and its leftovers take."""
    if root is None:
        return 0
    return sum(
        p.stat().st_size
        for folder in [root, *leftovers(root)]
        if folder.is_dir()
        for p in folder.rglob("*")
        if p.is_file()
    )


def remove(root: Path) -> int:
    """Delete the cache and its leftovers (never a folder holding anything else: refuse_foreign); returns the
    bytes freed."""
    refuse_foreign(root)
    folders = [f for f in [root, *leftovers(root)] if f.is_dir() and not foreign_files(f)]
    freed = sum(p.stat().st_size for f in folders for p in f.iterdir())
    for folder in folders:
        shutil.rmtree(folder)
    return freed


# ---------------------------------------------------------------------------------------------
# the empty model, its Linear groups


def empty_model(lm_cls, config, dtype: torch.dtype):
    """The model with meta parameters (nothing allocated or initialised) and real buffers (the rotary
    tables, computed on the CPU), as transformers' from_pretrained creates it before loading weights."""
    from accelerate import init_empty_weights
    from transformers.modeling_utils import no_init_weights

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), init_empty_weights(include_buffers=False):
            model = lm_cls(config)
    finally:
        torch.set_default_dtype(default)
    model.tie_weights()  # a tied head is then the embedding's parameter: read once, named once
    return model


def keeps_fp32(name: str, keep_fp32: list[str]) -> bool:
    """transformers' rule for `_keep_in_fp32_modules`: a listed name is one of the parameter's dotted parts."""
    return any(m in name.split(".") for m in keep_fp32)


def linear_groups(layer: nn.Module, prefix: str, quantised) -> dict[str, list[tuple[str, nn.Module]]]:
    """The Linears `quantised(path, module)` selects, by group: `<moe>.experts.<proj>` -> the E experts'
    (path, module) in expert order; any other Linear alone under its own path."""
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in layer.named_modules():
        path = prefix + name
        if quantised(path, module):
            m = EXPERT.match(path)
            groups.setdefault(f"{m['moe']}.{m['proj']}" if m else path, []).append((path, module))
    for members in groups.values():
        if EXPERT.match(members[0][0]):
            members.sort(key=lambda pm: int(EXPERT.match(pm[0])["index"]))
    return groups


def _to_quantise(skip: list[str]):
    from .scale import skipped_by_quantization

    return lambda path, module: type(module) is nn.Linear and not skipped_by_quantization(path, skip)


def _loaded_4bit(path: str, module: nn.Module) -> bool:
    from .hunyuan.fast_moe import _is_4bit

    return _is_4bit(module)


def _materialize(
    module: nn.Module,
    prefix: str,
    read,
    device,
    dtype: torch.dtype | None,
    keep_fp32: list[str],
    exclude: str | None = None,
) -> None:
    """Every meta parameter of `module` (but those under `exclude`) from read(<prefix><name>): floating
    tensors cast to dtype, or float32 for `_keep_in_fp32_modules`, as from_pretrained does (dtype None:
    kept as read)."""
    for name, param in list(module.named_parameters()):
        if param.device.type != "meta" or (exclude and name.startswith(exclude)):
            continue
        key = prefix + name
        value = read(key)
        if dtype is not None and value.is_floating_point():
            value = value.to(torch.float32 if keeps_fp32(key, keep_fp32) else dtype)
        owner, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner) if owner else module
        owner._parameters[leaf] = nn.Parameter(value.to(device), requires_grad=param.requires_grad)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


# ---------------------------------------------------------------------------------------------
# a layer from the checkpoint, a layer to and from the cache


class Checkpoint:
    """The checkpoint's tensors by name, each read when asked for (the shards stay memory-mapped)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        files = checkpoint_files(model_dir)
        if files[0].name == INDEX_FILE:
            self.shard_of = json.loads(files[0].read_text(encoding="utf-8"))["weight_map"]
        else:
            self.shard_of = dict.fromkeys(set(safetensors_header(files[0])[1]) - {"__metadata__"}, files[0].name)
        self._stack = ExitStack()
        self._files = {
            name: self._stack.enter_context(safe_open(str(model_dir / name), "pt"))
            for name in sorted(set(self.shard_of.values()))
        }

    def get(self, key: str) -> torch.Tensor:
        return self._files[self.shard_of[key]].get_tensor(key)

    def close(self) -> None:
        self._stack.close()


@dataclass(frozen=True)
class Recipe:
    """How the layers are made: the unquantised dtype, transformers' BitsAndBytesConfig (scale.bnb_config),
    the model class's `_keep_in_fp32_modules`."""

    dtype: torch.dtype
    quant: Any
    keep_fp32: tuple[str, ...] = ()

    @property
    def skip(self) -> list[str]:
        return list(self.quant.llm_int8_skip_modules or [])

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.quant.bnb_4bit_compute_dtype

    @property
    def nested(self) -> bool:
        return bool(self.quant.bnb_4bit_use_double_quant)

    @property
    def quant_type(self) -> str:
        return self.quant.bnb_4bit_quant_type


def quantise_layer(layer: nn.Module, prefix: str, recipe: Recipe) -> None:
    """Replace the layer's Linears (on their device) by bitsandbytes Linear4bit, as transformers does from the
    BitsAndBytesConfig, then pack each routed projection's experts (codes and block scales as slices of
    one buffer each, as the fast MoE reads them)."""
    from .hunyuan.fast_moe import NF4Experts
    from .hunyuan.random_init import quantize_linears_

    quantize_linears_(
        layer,
        skip=recipe.skip,
        compute_dtype=recipe.compute_dtype,
        double_quant=recipe.nested,
        quant_type=recipe.quant_type,
        prefix=prefix,
    )
    for members in linear_groups(layer, prefix, _loaded_4bit).values():
        if len(members) > 1:
            NF4Experts([m for _, m in members])  # packs in place; the fast path finds them packed


def _view_or_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    from .hunyuan.fast_moe import _is_packed, _stacked_view

    return _stacked_view(tensors) if len(tensors) > 1 and _is_packed(tensors) else torch.stack(tensors)


def layer_tensors(layer: nn.Module, prefix: str, raw=None) -> dict[str, torch.Tensor]:
    """What the cache keeps of a quantised, packed layer, on the CPU (packed codes are read where they are,
    not copied on the device). raw(key): an unquantised tensor as the checkpoint holds it (None: as loaded)."""
    out: dict[str, torch.Tensor] = {}
    quantised: set[str] = set()
    state = None
    for group, members in linear_groups(layer, prefix, _loaded_4bit).items():
        params = [m.weight for _, m in members]
        states = [p.quant_state for p in params]
        out[f"{group}.codes"] = _view_or_stack([p.data for p in params]).reshape(-1, 1)
        out[f"{group}.absmax"] = _view_or_stack([s.absmax for s in states])
        if states[0].nested:
            out[f"{group}.absmax2"] = torch.stack([s.state2.absmax for s in states])
            out[f"{group}.offset"] = torch.stack([s.offset.reshape(()) for s in states]).float()
        quantised |= {path for path, _ in members}
        state = states[0]
    for name, param in layer.named_parameters():
        if (prefix + name).rpartition(".")[0] not in quantised or name.endswith(".bias"):
            out[prefix + name] = raw(prefix + name) if raw else param.data
    if state is not None:
        out["nf4.code"] = state.code
        if state.nested:
            out["nf4.code2"] = state.state2.code
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def layer_from_cache(layer: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], device, recipe: Recipe) -> None:
    """Fill an empty layer from its cache tensors (on the device): Linear4bit modules whose codes and
    block scales are views of the group's packed tensors; the rest cast as from the checkpoint."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    code, code2 = tensors["nf4.code"], tensors.get("nf4.code2")
    for group, members in linear_groups(layer, prefix, _to_quantise(recipe.skip)).items():
        codes, absmax = tensors[f"{group}.codes"], tensors[f"{group}.absmax"]
        absmax2, offset = tensors.get(f"{group}.absmax2"), tensors.get(f"{group}.offset")
        out_f, in_f = members[0][1].out_features, members[0][1].in_features
        half = (out_f * in_f + 1) // 2
        if codes.numel() != len(members) * half or absmax.shape[0] != len(members):
            raise ValueError(f"{group}: {codes.numel()} code bytes for {len(members)} x ({out_f}, {in_f}) weights")
        for e, (path, linear) in enumerate(members):
            state2 = (
                None
                if absmax2 is None
                else QuantState(absmax=absmax2[e], code=code2, blocksize=BLOCKSIZE2, dtype=torch.float32)
            )
            state = QuantState(
                absmax=absmax[e],
                shape=torch.Size((out_f, in_f)),
                code=code,
                blocksize=BLOCKSIZE,
                quant_type=recipe.quant_type,
                dtype=recipe.dtype,
                offset=None if offset is None else offset[e],
                state2=state2,
            )
            q = bnb.nn.Linear4bit(
                in_f,
                out_f,
                bias=linear.bias is not None,
                compute_dtype=recipe.compute_dtype,
                compress_statistics=recipe.nested,
                quant_type=recipe.quant_type,
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                codes[e * half : (e + 1) * half],
                requires_grad=False,
                quant_state=state,
                blocksize=BLOCKSIZE,
                compress_statistics=recipe.nested,
                quant_type=recipe.quant_type,
                quant_storage=torch.uint8,
                module=q,
                bnb_quantized=True,
            )
            q.quant_state = state
            if linear.bias is not None:
                q.bias = nn.Parameter(tensors[path + ".bias"].to(recipe.dtype), requires_grad=False)
            _set_module(layer, path.removeprefix(prefix), q)
    _materialize(layer, prefix, tensors.__getitem__, device, recipe.dtype, recipe.keep_fp32)


# ---------------------------------------------------------------------------------------------
# writing the cache


class CacheWriter:
    """Files go to a temporary sibling of the cache folder, which becomes the cache only in publish();
    a write that fails (disk full, permissions) drops the cache with a line, never the load."""

    def __init__(self, root: Path, key: dict):
        self.root, self.key, self.sizes, self.tmp = root, key, {}, None
        self.t0 = time.perf_counter()
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        except OSError as e:
            self._fail(e)

    def _fail(self, e: OSError) -> None:
        print(f"not writing the NF4 cache at {self.root}: {e}", flush=True)
        self.discard()

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if self.tmp is None:
            return
        try:
            save_file(tensors, str(self.tmp / name), metadata={"format": "pt"})
            self.sizes[name] = (self.tmp / name).stat().st_size
        except OSError as e:
            self._fail(e)

    def publish(self, layers: int) -> bool:
        if self.tmp is None:
            return False
        try:
            for name in self.sizes:  # on disk before the rename makes them the cache
                with open(self.tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            write_json(
                self.tmp / CACHE_INFO,
                {
                    "key": self.key,
                    "sizes": self.sizes,
                    "layers": layers,
                    "write_s": round(time.perf_counter() - self.t0, 1),
                },
            )
            honour_umask(self.tmp)
            publish_dir(self.tmp, self.root)
        except OSError as e:
            self._fail(e)
            return False
        self.tmp = None
        return True

    def discard(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None


def outer_tensors(model, raw=None) -> dict[str, torch.Tensor]:
    """Everything outside the decoder layers (a tied head is the embedding: named once)."""
    return {
        n: (raw(n) if raw else p).detach().contiguous().cpu()
        for n, p in model.named_parameters()
        if not n.startswith("model.layers.")
    }


def write_cache(model, root: Path, key: dict) -> bool:
    """The cache of an NF4 model already in memory (quantised, packed: e.g. random weights for a benchmark)."""
    writer = CacheWriter(root, key)
    try:
        for i, layer in enumerate(model.model.layers):
            writer.save(layer_file(i), layer_tensors(layer, f"model.layers.{i}."))
        writer.save(OUTER_FILE, outer_tensors(model))
        return writer.publish(len(model.model.layers))
    finally:
        writer.discard()


def nf4_bytes(model, skip: list[str]) -> int:
    """Bytes of an empty (meta) model once quantised: the Linears the skip rule quantises at
    scale.NF4_BYTES_PER_PARAM (codes + block scales), the rest as they are."""
    from .scale import NF4_BYTES_PER_PARAM

    selected = _to_quantise(skip)
    quantised = {id(m.weight) for n, m in model.named_modules() if selected(n, m)}
    return int(
        sum(p.numel() * (NF4_BYTES_PER_PARAM if id(p) in quantised else p.element_size()) for p in model.parameters())
    )


# ---------------------------------------------------------------------------------------------
# the load


def _finish(model, model_dir: Path, device, recipe: Recipe) -> None:
    """What from_pretrained leaves on a bitsandbytes 4-bit model, which PEFT, the Trainer and generate read."""
    from transformers import GenerationConfig
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)
    model.tie_weights()
    model.is_loaded_in_4bit = model.is_quantized = True
    model.quantization_method = "bitsandbytes"
    quant = copy.deepcopy(recipe.quant)
    quant.llm_int8_skip_modules = recipe.skip + list(recipe.keep_fp32)  # transformers records both as not converted
    model.hf_quantizer = Bnb4BitHfQuantizer(quant)
    model.config.quantization_config = quant
    model.config.torch_dtype = recipe.dtype
    model.config._name_or_path = model.name_or_path = str(model_dir)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    model.eval()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the last bf16 layer's blocks go back to the driver whole


def load(model_dir: str | Path, lm_cls, config, device, dtype: torch.dtype, quant, *, cache: Path | None = None):
    """The NF4 model of `model_dir` on `device`, in eval mode; returns (model, one line: where it came from).

    quant: the BitsAndBytesConfig (scale.bnb_config). `config` may have fewer layers than the checkpoint
    (its first ones are read). cache: the cache folder (None: none). Valid: read from it. Missing, stale or
    damaged: the checkpoint is quantised and the cache written on the way when the disk has room; a line
    says which."""
    model_dir = Path(model_dir)
    recipe = Recipe(dtype, quant, tuple(getattr(lm_cls, "_keep_in_fp32_modules", None) or ()))
    key = cache_key(model_dir, dtype, quant) if cache is not None else None
    state, why = cache_state(cache, key)
    model = empty_model(lm_cls, config, dtype)
    layers = len(model.model.layers)
    if state == "valid":
        cached_layers = json.loads((cache / CACHE_INFO).read_text(encoding="utf-8")).get("layers")
        if cached_layers == layers:
            t0 = time.perf_counter()
            try:
                _read_cache(model, cache, device, recipe)
                _finish(model, model_dir, device, recipe)
                return model, f"read from the NF4 cache at {cache} in {time.perf_counter() - t0:.0f} s"
            except Exception as e:
                state, why = "damaged", f"the NF4 cache at {cache} could not be read ({type(e).__name__}: {e})"
                model = empty_model(lm_cls, config, dtype)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        else:
            state, why = "other depth", f"the NF4 cache at {cache} holds {cached_layers} layers, this model {layers}"
            print(f"{why}: quantising the checkpoint, the cache left as it is", flush=True)
    writer = None
    if cache is not None and state != "other depth":
        if state in ("stale", "damaged"):
            print(f"{why}: rebuilding it from the checkpoint", flush=True)
        remove(cache)  # a stale cache and killed writes' leftovers are never read again: their disk is the new one's
        need, free = nf4_bytes(model, recipe.skip), shutil.disk_usage(_existing(cache.parent)).free
        if free < need * 1.05:
            print(
                f"not writing the NF4 cache at {cache}: it needs ~{need / 1e9:.0f} GB, the disk has {free / 1e9:.0f} "
                "GB free (model.nf4_cache: a folder on a larger disk, or none)",
                flush=True,
            )
        else:
            print(f"writing the NF4 cache to {cache} while loading (~{need / 1e9:.1f} GB, once)", flush=True)
            writer = CacheWriter(cache, key)
    t0 = time.perf_counter()
    try:
        _read_checkpoint(model, model_dir, device, recipe, writer)
        written = writer is not None and writer.publish(layers)
    finally:
        if writer is not None:
            writer.discard()
    _finish(model, model_dir, device, recipe)
    how = f"quantised from the checkpoint in {time.perf_counter() - t0:.0f} s"
    return model, how + (f"; NF4 cache written to {cache}" if written else "")


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _read_checkpoint(model, model_dir: Path, device, recipe: Recipe, writer: CacheWriter | None) -> None:
    reader = Checkpoint(model_dir)
    try:
        _materialize(model, "", reader.get, device, recipe.dtype, recipe.keep_fp32, exclude="model.layers.")
        model.tie_weights()
        for i, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{i}."
            _materialize(layer, prefix, reader.get, device, recipe.dtype, recipe.keep_fp32)
            quantise_layer(layer, prefix, recipe)
            if writer is not None:
                writer.save(layer_file(i), layer_tensors(layer, prefix, raw=reader.get))
        if writer is not None:
            writer.save(OUTER_FILE, outer_tensors(model, raw=reader.get))
    finally:
        reader.close()


def _read_cache(model, root: Path, device, recipe: Recipe) -> None:
    from safetensors.torch import load_file

    outer = load_file(str(root / OUTER_FILE), device=str(device))
    _materialize(model, "", outer.__getitem__, device, recipe.dtype, recipe.keep_fp32, exclude="model.layers.")
    model.tie_weights()
    for i, layer in enumerate(model.model.layers):
        layer_from_cache(
            layer, f"model.layers.{i}.", load_file(str(root / layer_file(i)), device=str(device)), device, recipe
        )
