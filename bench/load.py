"""Load and merge, measured (issue 22): bench/results/load-<card>-<date>.json (+ .md with the setting).

    run(carry=[".whl"], command="bash bench/load_gpu.sh")          # the device machine (one H200)
    .venv/bin/python bench/load.py --tiny --work /tmp/lb --out /tmp/lb-out   # the same steps on the CPU, tiny

What runs, in order (the GPU machine's disk holds 64 GiB: the 32-layer cache and the 8-layer checkpoint
never exist together):
1. the NF4 cache of all 32 layers, written from random weights made layer by layer on the GPU
   (modeling.load_random_model; the 160 GB checkpoint does not fit the disk) into a folder whose config
   is the real one and whose index names the real keys (its shards are placeholders, never read: a cache
   load reads only the cache), then read through modeling.load_base_model with configs/huanhuan_qlora.yaml;
2. a real-layout bf16 checkpoint of 8 layers: random weights, the real state-dict keys, shapes and dtypes,
   5 GB shards; a second folder with the config and index of its first 4 layers (the same shards);
3. NF4 loads through modeling.load_base_model with configs/huanhuan_qlora.yaml (model.nf4_cache: none) of
   4 and 8 layers; 32 layers extrapolated linearly from the two;
4. `make merge`'s merge.run of a random adapter of the config's LoRA (the tutorial preset, r 8) into the
   8-layer checkpoint, in a process that sees no GPU: seconds and peak RSS.
The page cache is dropped before each load and the merge (/proc/sys/vm/drop_caches when permitted, else
posix_fadvise(DONTNEED) on every file; the .md says which). Loads run in one process, one after the
other: allocated memory is counted from what was allocated before the load (the CUDA context and nothing
else), the peak reset before each.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from hunyuan_lora import config, merge, modeling, nf4, runtime, scale, stand_in
from hunyuan_lora.hunyuan.a13b import real_config

REPO = Path(__file__).resolve().parents[1]
QLORA = REPO / "configs/huanhuan_qlora.yaml"
GIB = 2**30
SHARD_BYTES = 5 * 10**9


def cut(config_json: dict, layers: int) -> dict:
    """config.json with only its first `layers` decoder layers (per-layer lists cut to match)."""
    out = dict(config_json)
    n = out["num_hidden_layers"]
    for key, value in out.items():
        if isinstance(value, list) and len(value) == n and key != "architectures":
            out[key] = value[:layers]
    out["num_hidden_layers"] = layers
    return out


def tiny_config() -> dict:
    """A small model of the same layout, for a CPU run of these steps."""
    c = cut(real_config(), 8)
    c.update(
        hidden_size=64,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_head_dim=16,
        num_experts=8,
        vocab_size=1024,
        moe_intermediate_size=[48] * 8,
        moe_topk=[2] * 8,
        pad_token_id=1023,
        eos_token_id=1022,
        eod_token_id=1021,
        sep_token_id=1020,
    )
    return c


def keys_and_shapes(config_json: dict) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The checkpoint's tensors (name, shape, dtype) in file order: the project's model on the meta device."""
    from hunyuan_lora.hunyuan.configuration_hunyuan import HunYuanConfig
    from hunyuan_lora.hunyuan.hunyuan import HunYuanMoEV1ForCausalLM

    with torch.device("meta"):
        model = HunYuanMoEV1ForCausalLM(HunYuanConfig(**{k: v for k, v in config_json.items() if k != "auto_map"}))
    tied = config_json.get("tie_word_embeddings", False)
    out = []
    for name, p in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        out.append((name, tuple(p.shape), torch.float32 if name.endswith("mlp.gate.wg.weight") else torch.bfloat16))

    def order(item):  # the embedding, then layer by layer, then the final norm
        n = item[0]
        return (int(n.split(".")[2]) if n.startswith("model.layers.") else (-1 if "embed" in n else 10**6)), n

    return sorted(out, key=order)


def model_folder(folder: Path, config_json: dict) -> None:
    """config.json, Tencent-layout code and tokenizer files (the stand-in's), as `make download` leaves them."""
    template = folder.with_name(folder.name + "-template")
    stand_in.build(template, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    for p in template.iterdir():
        if (
            p.is_file()
            and not p.name.endswith(".safetensors")
            and p.name not in ("config.json", "stand_in.json", "model.safetensors.index.json")
        ):
            shutil.copy2(p, folder / p.name)
    shutil.rmtree(template)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))


def write_checkpoint(folder: Path, config_json: dict, device: str, shard_bytes: int) -> dict:
    """Random bf16 weights (float32 router) under the real keys, in shards of at most shard_bytes."""
    from safetensors.torch import save_file

    model_folder(folder, config_json)
    tensors = keys_and_shapes(config_json)
    shards, size = [[]], 0
    for name, shape, dtype in tensors:
        nbytes = torch.Size(shape).numel() * (4 if dtype == torch.float32 else 2)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype))
        size += nbytes
    weight_map, total = {}, 0
    gen = torch.Generator(device=device).manual_seed(0)
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        data = {k: (torch.randn(s, generator=gen, device=device, dtype=d) * 0.02).cpu() for k, s, d in shard}
        save_file(data, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in data.values())
        weight_map |= dict.fromkeys(data, name)
        del data
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    return weight_map


def shallower(src: Path, dst: Path, layers: int) -> None:
    """A folder of src's first `layers` layers: its own config and index, src's shards (symlinked)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.suffix == ".safetensors":
            (dst / p.name).symlink_to(p)
        elif p.is_file() and p.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(p, dst / p.name)
    config_json = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cut(config_json, layers), indent=2))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    keep = {
        k: v
        for k, v in index["weight_map"].items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers
    }
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}, indent=1))


def placeholder_folder(folder: Path, config_json: dict) -> None:
    """The real config and an index of the real keys whose shards are placeholders (a cache load never
    reads them; the cache's key records their sizes and times)."""
    model_folder(folder, config_json)
    weight_map = {
        name: f"model-{i % 4 + 1:05d}-of-00004.safetensors"
        for i, (name, _, _) in enumerate(keys_and_shapes(config_json))
    }
    for name in set(weight_map.values()):
        (folder / name).write_bytes(b"placeholder: never read by a cache load\n")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def drop_page_cache(files: list[Path]) -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "sync; echo 3 > /proc/sys/vm/drop_caches"
    except OSError:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "sync, then posix_fadvise(POSIX_FADV_DONTNEED) on every file (drop_caches not permitted)"


def files_under(*folders: Path) -> list[Path]:
    return [p.resolve() for f in folders for p in f.rglob("*") if p.is_file() or p.is_symlink()]


def measure_load(cfg) -> dict:
    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    loaded = modeling.load_base_model(cfg, runtime.placement(cfg))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - before) / GIB if cuda else None
    final = (torch.cuda.memory_allocated() - before) / GIB if cuda else None
    layers = len(loaded.model.model.layers)
    source = loaded.source
    del loaded
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "layers": layers,
        "load_s": round(seconds, 1),
        "peak_alloc_gib": None if peak is None else round(peak, 2),
        "final_alloc_gib": None if final is None else round(final, 2),
        "source_line": source,
    }


def random_adapter(folder: Path, base: Path, cfg) -> None:
    """A LoRA adapter of cfg's targets on every Linear of `base`'s architecture, random A and B (float32)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    targets = set(cfg.lora.targets())
    tensors = {}
    gen = torch.Generator().manual_seed(1)
    for name, shape, _ in keys_and_shapes(json.loads((base / "config.json").read_text())):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in targets and len(shape) == 2 and "embed" not in module:
            out_f, in_f = shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(cfg.lora.r, in_f, generator=gen) * 0.01
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, cfg.lora.r, generator=gen) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=sorted(targets)).save_pretrained(str(folder))


def merge_child(base: str, adapter: str, out: str) -> None:
    """(subprocess, no GPU visible) merge.run as `make merge` runs it; prints its seconds and peak RSS."""
    cfg = config.load(QLORA, [f"infer.adapter={adapter}"], model_dir=base, output_dir=out)
    t0 = time.perf_counter()
    merge.run(cfg)
    print(
        json.dumps(
            {
                "merge_s": round(time.perf_counter() - t0, 1),
                "gpu": torch.cuda.is_available(),
                "peak_rss_gib": round(peak_rss_kib() / 2**20, 2),
            }
        )
    )


def peak_rss_kib() -> int:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that across exec, so a
    child started by a large parent reports the parent's peak (41 GiB here in the first run: the bench's)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])


def run_merge(base: Path, adapter: Path, out: Path, layers: int, gpu: bool = False) -> dict:
    """merge.run in a process of its own (seeing the GPU or not); its row."""
    env = {**os.environ} if gpu else {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, __file__, "--merge-child", str(base), str(adapter), str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    print(proc.stdout[-2000:], proc.stderr[-2000:], flush=True)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f"the merge failed: {proc.stderr[-500:]}")
    return {"what": "merge", "layers": layers, **json.loads(proc.stdout.strip().splitlines()[-1])}


def merge_only(layers: int, work: Path, out: Path) -> None:
    """Step 4 alone: without a GPU, and with one when this machine has it (merge.run uses it when present)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    gpu = torch.cuda.is_available()
    base, adapter = work / f"d{layers}", work / "adapter"
    write_checkpoint(base, cut(real_config(), layers), "cuda" if gpu else "cpu", SHARD_BYTES)
    random_adapter(adapter, base, config.load(QLORA))
    rows, how = [], None
    for visible in (False, True) if gpu else (False,):
        how = drop_page_cache(files_under(base))
        rows.append(run_merge(base, adapter, work / "merge-run", layers, gpu=visible))
        print(rows[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0).replace(" ", "-") if gpu else "cpu"
    stamp = time.strftime("%Y-%m-%d")
    (out / f"load-{card}-{stamp}-merge.json").write_text(json.dumps(rows, indent=1) + "\n")
    notes = {
        "card": card,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "page_cache": how,
        "checkpoint_bytes": sum(p.stat().st_size for p in base.glob("*.safetensors")),
        "code_commit": runtime.git_commit(),
    }
    (out / f"load-{card}-{stamp}-merge.notes.json").write_text(json.dumps(notes, indent=1) + "\n")
    shutil.rmtree(work)


def extrapolate(a: dict, b: dict, layers: int, key: str) -> float:
    slope = (b[key] - a[key]) / (b["layers"] - a["layers"])
    return round(a[key] + slope * (layers - a["layers"]), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/loadbench")
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    ap.add_argument("--tiny", action="store_true", help="the same steps on a tiny model, on the CPU")
    ap.add_argument("--merge-child", nargs=3, metavar=("BASE", "ADAPTER", "OUT"))
    ap.add_argument(
        "--merge-only",
        type=int,
        metavar="LAYERS",
        help="only step 4: a real-layout checkpoint of LAYERS layers, merged without and with a GPU",
    )
    args = ap.parse_args()
    if args.merge_child:
        return merge_child(*args.merge_child)
    if args.merge_only:
        return merge_only(args.merge_only, Path(args.work), Path(args.out))
    device = "cpu" if args.tiny else "cuda"
    work, out = Path(args.work), Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    real = tiny_config() if args.tiny else real_config()
    shard_bytes = 200_000 if args.tiny else SHARD_BYTES
    sets = [] if not args.tiny else ["model.device=cpu"]
    card = torch.cuda.get_device_name(0).replace(" ", "-") if device == "cuda" else "cpu"
    stamp = time.strftime("%Y-%m-%d")
    from hunyuan_lora.probe import gemm_rate

    rate, gemm_what = gemm_rate(device)
    notes = {
        "card": card,
        "date": stamp,
        "torch": torch.__version__,
        "gemm_tflops": round(rate / 1e12, 1),
        "gemm": gemm_what,
        "config": str(QLORA.relative_to(REPO)),
        "code_commit": runtime.git_commit(),
    }
    rows: list[dict] = []

    def save() -> None:
        (out / f"load-{card}-{stamp}.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / f"load-{card}-{stamp}.notes.json").write_text(json.dumps(notes, indent=1) + "\n")

    def step(what: str) -> None:
        print(f"== {what} ({time.strftime('%H:%M:%S')})", flush=True)

    # 1. the NF4 cache of all 32 layers, from random weights
    step("NF4 cache of 32 layers from random weights")
    d32, cache = work / "d32", work / "d32.nf4-cache"
    placeholder_folder(d32, real)
    cfg32 = config.load(QLORA, sets + [f"model.nf4_cache={cache}"], model_dir=str(d32))
    where = runtime.placement(cfg32)
    t0 = time.perf_counter()
    random_model = modeling.load_random_model(cfg32, where).model
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert nf4.write_cache(random_model, cache, nf4.cache_key(d32, where.dtype, scale.bnb_config(cfg32)))
    notes["cache"] = {
        "random_build_s": round(built, 1),
        "write_s": round(time.perf_counter() - t0, 1),
        "bytes": nf4.cache_bytes(cache),
    }
    del random_model
    notes["page_cache"] = drop_page_cache(files_under(cache, d32))
    step("load from the cache")
    r = measure_load(cfg32)
    notes["cache"]["source_line"] = r.pop("source_line")
    rows.append({**r, "quantization": "nf4", "source": "cache", "how": "measured"})
    save()
    print(rows[-1], flush=True)
    shutil.rmtree(cache)

    # 2. the 8-layer checkpoint and its 4-layer view
    step("bf16 checkpoint of 8 layers")
    d8, d4 = work / "d8", work / "d4"
    t0 = time.perf_counter()
    write_checkpoint(d8, cut(real, 8), device, shard_bytes)
    notes["checkpoint"] = {
        "write_s": round(time.perf_counter() - t0, 1),
        "bytes": sum(p.stat().st_size for p in d8.glob("*.safetensors")),
        "shards": len(list(d8.glob("*.safetensors"))),
    }
    shallower(d8, d4, 4)

    # 3. NF4 loads from the checkpoint
    measured = {}
    for layers, folder in ((4, d4), (8, d8)):
        step(f"NF4 load of {layers} layers from the checkpoint")
        drop_page_cache(files_under(d8))
        r = measure_load(config.load(QLORA, sets + ["model.nf4_cache=none"], model_dir=str(folder)))
        notes.setdefault("checkpoint_sources", {})[layers] = r.pop("source_line")
        measured[layers] = r
        rows.append({**r, "quantization": "nf4", "source": "checkpoint", "how": "measured"})
        save()
        print(rows[-1], flush=True)
    if measured[4]["peak_alloc_gib"] is not None:
        rows.append(
            {
                "layers": 32,
                "quantization": "nf4",
                "source": "checkpoint",
                **{
                    k: extrapolate(measured[4], measured[8], 32, k)
                    for k in ("load_s", "peak_alloc_gib", "final_alloc_gib")
                },
                "how": "extrapolated from depths 4 and 8 (linear in layers)",
            }
        )
        save()

    # 4. the merge, no GPU
    step("merge of 8 layers, no GPU")
    shm = Path("/dev/shm")
    for layers, base in ((8, d8), (4, d4)):  # 4: when nothing holds a second 8-layer folder
        adapter = work / f"adapter-{layers}"
        random_adapter(adapter, base, config.load(QLORA))
        index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
        need = 1.05 * sum((base / s).stat().st_size for s in set(index.values()))
        target = next((t for t in (shm, work) if t.is_dir() and shutil.disk_usage(t).free > need), None)
        if target is None:
            notes[f"merge_{layers}"] = f"not run: {need / 1e9:.0f} GB needed for the merged folder, no disk had it"
            continue
        notes["merge_output"] = str(target) + (
            " (tmpfs: the 64 GB disk cannot hold two 8-layer folders)" if target == shm else ""
        )
        drop_page_cache(files_under(d8))
        try:
            rows.append(run_merge(base, adapter, target / "merge-run", layers))
            break
        except RuntimeError as e:
            notes[f"merge_{layers}"] = str(e)
    save()
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
