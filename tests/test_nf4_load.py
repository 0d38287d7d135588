"""The NF4 load (nf4.py) on the stand-in, on the CPU (bitsandbytes 0.48.2 quantises NF4 on its CPU backend):
what transformers' own NF4 load makes, built layer by layer with nothing of a layer left over once it is
packed; the NF4 cache gives the same model bit for bit, is rebuilt when stale or damaged, is never used
half-written, and `make check` / `make clean-cache` see it."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hunyuan_lora import clean_cache, config, modeling, nf4, preflight, runtime, scale
from hunyuan_lora.errors import UserError
from hunyuan_lora.estimate import human_bytes

REPO = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 42, 99, 3, 7, 8, 300]])


def nf4_cfg(model_dir: Path, *extra: str) -> config.Config:
    return config.load(
        REPO / "configs/demo.yaml",
        ["model.quantization=nf4", "model.moe_impl=fast", "model.device=cpu", *extra],
        model_dir=str(model_dir),
    )


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def live_bytes() -> int:
    """Bytes of every tensor storage the process's Python objects hold (each storage once)."""
    gc.collect()
    storages = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type != "meta":
            s = o.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of the storages a loaded module holds: parameters, buffers and 4-bit quantisation states."""
    tensors = list(module.parameters()) + list(module.buffers())
    for m in module.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code] + (
                [state.offset, state.state2.absmax, state.state2.code] if state.nested else []
            )
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def test_nf4_load_is_transformers_nf4_built_layer_by_layer(model_copy, monkeypatch):
    """Equal, tensor for tensor and logit for logit, to transformers' from_pretrained with the same
    BitsAndBytesConfig (its environment check, which wants CUDA, bypassed: the quantisation itself runs on
    bitsandbytes' CPU backend). While loading, what is alive after each layer is packed is the model so far:
    neither the layer's float weights nor its experts' unpacked 4-bit codes outlive their packing."""
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    cfg = nf4_cfg(model_copy, "model.nf4_cache=none")
    where = runtime.placement(cfg)
    after_layer = []
    quantise = nf4.quantise_layer

    def measured(layer, prefix, recipe):
        quantise(layer, prefix, recipe)
        after_layer.append(live_bytes())

    monkeypatch.setattr(nf4, "quantise_layer", measured)
    before = live_bytes()
    loaded = modeling.load_base_model(cfg, where)
    model = loaded.model
    assert loaded.source.startswith("quantised from the checkpoint")
    assert "cache" not in loaded.source
    layers = model.model.layers
    per_layer = [storage_bytes(layer) for layer in layers]
    outer = storage_bytes(model) - sum(per_layer)
    for i, alive in enumerate(after_layer):
        # the model so far (+ 1 % for the loader's own small objects), never the layers to come
        assert alive - before <= 1.01 * (outer + sum(per_layer[: i + 1])), (i, alive - before, per_layer)
    from hunyuan_lora.hunyuan.fast_moe import _is_packed

    for layer in layers:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert _is_packed([getattr(e, proj).weight.data for e in layer.mlp.experts])

    monkeypatch.setattr(Bnb4BitHfQuantizer, "validate_environment", lambda self, *a, **k: None)
    lm_cls, model_config = modeling._model_classes(cfg)
    reference = lm_cls.from_pretrained(
        str(model_copy),
        config=model_config,
        torch_dtype=where.dtype,
        quantization_config=scale.bnb_config(cfg),
        device_map={"": "cpu"},
    )
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key
    assert model.config.to_dict() == reference.config.to_dict()
    assert model.generation_config == reference.generation_config
    assert not model.training
    assert torch.equal(logits(model), logits(reference))


def _quant_fields(model) -> dict:
    out = {}
    for name, m in model.named_modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            out[name] = (
                m.weight.data,
                state.absmax,
                state.code,
                state.offset,
                state.state2.absmax,
                state.state2.code,
                tuple(state.shape),
                state.dtype,
                state.blocksize,
                state.quant_type,
                state.state2.blocksize,
                m.compute_dtype,
            )
    return out


def _same(a, b) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def test_the_cache_gives_the_same_model_and_a_stale_or_damaged_one_is_rebuilt(model_copy, capsys):
    cfg = nf4_cfg(model_copy)
    where = runtime.placement(cfg)
    root = nf4.cache_dir("auto", model_copy)
    fresh = modeling.load_base_model(cfg, where)
    assert fresh.source.endswith(f"NF4 cache written to {root}")
    files = json.loads((root / nf4.CACHE_INFO).read_text())["sizes"]
    assert set(files) == {nf4.OUTER_FILE, nf4.layer_file(0), nf4.layer_file(1)}

    cached = modeling.load_base_model(cfg, where)
    assert cached.source.startswith(f"read from the NF4 cache at {root}")
    assert torch.equal(logits(cached.model), logits(fresh.model))
    ours, theirs = _quant_fields(cached.model), _quant_fields(fresh.model)
    assert ours.keys() == theirs.keys()
    assert len(ours) == 2 * (8 * 3 + 3 + 4)
    assert all(_same(ours[k], theirs[k]) for k in ours)
    a, b = cached.model.state_dict(), fresh.model.state_dict()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in b)
    # the packed experts the fast MoE reads are views of the cache's packed tensors
    from hunyuan_lora.hunyuan.fast_moe import _is_packed

    assert _is_packed([e.up_proj.weight.data for e in cached.model.model.layers[1].mlp.experts])
    capsys.readouterr()

    # damaged: a layer file cut short
    layer = root / nf4.layer_file(1)
    layer.write_bytes(layer.read_bytes()[:-64])
    rebuilt = modeling.load_base_model(cfg, where)
    out = capsys.readouterr().out
    assert f"has {nf4.layer_file(1)} at" in out
    assert "rebuilding it from the checkpoint" in out
    assert rebuilt.source.endswith("NF4 cache written to " + str(root))
    assert torch.equal(logits(rebuilt.model), logits(fresh.model))
    # stale: a shard changed since (its modification time)
    shard = next(model_copy.glob("model-00001-*.safetensors"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    modeling.load_base_model(cfg, where)
    out = capsys.readouterr().out
    assert f"was made from other inputs ({shard.name} changed): rebuilding it" in out
    # a damaged header in a file of the right size is seen without reading the weights
    key = nf4.cache_key(model_copy, where.dtype, scale.bnb_config(cfg))
    assert nf4.cache_state(root, key)[0] == "valid"
    data = bytearray(layer.read_bytes())
    data[8:16] = b"\x00" * 8
    layer.write_bytes(bytes(data))
    state, line = nf4.cache_state(root, key)
    assert state == "damaged"
    assert f"unreadable {nf4.layer_file(1)}" in line


KILLED_WRITE = """
import os, signal, sys
from hunyuan_lora import config, modeling, nf4, runtime
save = nf4.CacheWriter.save
def save_then_die(self, name, tensors):
    save(self, name, tensors)
    if name == nf4.layer_file(0):
        os.kill(os.getpid(), signal.SIGKILL)
nf4.CacheWriter.save = save_then_die
cfg = config.load(sys.argv[1], ["model.quantization=nf4", "model.moe_impl=fast", "model.device=cpu"],
                  model_dir=sys.argv[2])
modeling.load_base_model(cfg, runtime.placement(cfg))
"""


def test_a_cache_write_killed_midway_leaves_nothing_used_and_clean_cache_removes_it(model_copy, capsys):
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITE, str(REPO / "configs/demo.yaml"), str(model_copy)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = nf4.cache_dir("auto", model_copy)
    cfg = nf4_cfg(model_copy)
    where = runtime.placement(cfg)
    assert not root.exists()
    [leftover] = nf4.leftovers(root)
    assert (leftover / nf4.layer_file(0)).is_file()
    assert not (leftover / nf4.CACHE_INFO).exists()
    params = preflight.check_parameters(cfg, json.loads((model_copy / "config.json").read_text()))[2]
    status, detail = preflight.check_nf4_cache(cfg, params, where)
    assert status == "ok"
    assert f"no NF4 cache at {root} yet: the first NF4 load writes it" in detail
    assert f"{leftover.name} beside it: left by killed writes, never read" in detail

    # the next load writes a whole cache and drops the leftover (never read, its disk is the new cache's)
    assert modeling.load_base_model(cfg, where).source.endswith(f"NF4 cache written to {root}")
    assert not nf4.leftovers(root)
    status, detail = preflight.check_nf4_cache(cfg, params, where)
    assert status == "ok"
    assert detail.startswith(f"will be used: NF4 cache at {root}")
    assert f"; {human_bytes(nf4.cache_bytes(root))} on disk (`make clean-cache` removes it)" in detail
    another = root.with_name(f".{root.name}-killed")  # what a later killed rebuild would leave
    another.mkdir()
    (another / nf4.layer_file(0)).write_bytes(b"x" * 1000)
    assert nf4.cache_bytes(root) == sum(p.stat().st_size for p in root.iterdir()) + 1000
    capsys.readouterr()
    assert clean_cache.run(cfg) == root
    assert "removed the NF4 cache" in capsys.readouterr().out
    assert not root.exists()
    assert not nf4.leftovers(root)
    assert preflight.check_nf4_cache(nf4_cfg(model_copy, "model.nf4_cache=none"), params, where)[1].startswith("none")


@pytest.mark.parametrize(("setting", "expected"), [("auto", "{dir}.nf4-cache"), ("none", None), ("/data/c", "/data/c")])
def test_where_the_cache_goes(setting, expected, tmp_path):
    model_dir = tmp_path / "Hunyuan-A13B-Instruct"
    want = None if expected is None else Path(expected.format(dir=model_dir))
    assert nf4.cache_dir(setting, model_dir) == want


def test_a_cache_setting_naming_a_folder_of_other_files_is_refused_and_left_alone(model_copy, tmp_path, capsys):
    """model.nf4_cache=/data (meant as "put it in there"): the kit would delete and rewrite that folder."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    cfg = nf4_cfg(model_copy, f"model.nf4_cache={data}")
    with pytest.raises(
        UserError,
        match=r"model.nf4_cache: model.nf4_cache is .*data, which holds what no NF4 cache "
        r"write made \(notes.txt\)",
    ):
        modeling.load_base_model(cfg, runtime.placement(cfg))
    with pytest.raises(UserError, match="notes.txt"):
        clean_cache.run(cfg)
    assert [p.name for p in data.iterdir()] == ["notes.txt"]
    assert nf4.foreign_files(data) == ["notes.txt"]
