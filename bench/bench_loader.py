"""Training-loader throughput: tar read -> JPEG decode -> CLIP preprocessing -> tokenize -> collate.

Writes synthetic shards (224 px JPEGs; --photo: 640x480 noisy JPEGs, closer to COCO's decode cost) to a temp dir,
then times one epoch of StreamingLoader for num_workers 0/1/2 with the tiny "demo" processor (64 px) and the
default 224 px CLIPImageProcessor, plus a per-stage breakdown of one sample's cost.

    .venv/bin/python bench/bench_loader.py [--samples 2000] [--photo] [--torch-threads 1]

--url: the same shards read from local disk, from a local HTTP server (`python -m http.server` in a subprocess,
so it does not share the loader's GIL) and through `pipe:cat`, interleaved repeats (min / median / max);
`--url SPEC` adds a remote spec of your own (e.g. https://host/shards/train, whose sizes.json names its shards).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import webdataset as wds
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmcoconut.config import Config  # noqa: E402
from mmcoconut.data.loader import StreamingLoader  # noqa: E402
from mmcoconut.data.pipeline import FastClipPreprocess  # noqa: E402
from mmcoconut.data.synthetic import draw_image, make_record  # noqa: E402
from mmcoconut.tiny_models import make_tiny_models  # noqa: E402


def write_shards(out: str, n: int, n_shards: int, photo: bool) -> str:
    per, sizes, rng = -(-n // n_shards), {}, np.random.default_rng(0)
    for s in range(n_shards):
        name = f"train-{s:06d}.tar"
        with wds.TarWriter(os.path.join(out, name)) as tw:
            for i in range(s * per, min(n, (s + 1) * per)):
                rec = make_record(i, 0)
                if photo:  # smooth gradient + noise: decodes like a photo, not like flat synthetic shapes
                    base = np.linspace(0, 255, 640, dtype=np.float32)[None, :, None] * np.ones((480, 1, 3))
                    img = Image.fromarray((base * 0.6 + rng.integers(0, 100, (480, 640, 3))).astype(np.uint8))
                else:
                    img = draw_image(rec, 224)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                rec = {k: v for k, v in rec.items() if k != "scene"}
                tw.write({"__key__": rec["question_id"], "jpg": buf.getvalue(), "json": json.dumps(rec).encode()})
                sizes[name] = sizes.get(name, 0) + 1
    json.dump(sizes, open(os.path.join(out, "sizes.json"), "w"))
    return os.path.join(out, "train")


def epoch_rate(spec, tok, proc, workers: int, micro: int = 32, samples_per_epoch=None) -> float:
    cfg = Config()
    cfg.data.num_workers, cfg.data.shuffle_buffer, cfg.data.samples_per_epoch = workers, 256, samples_per_epoch
    L = StreamingLoader(spec, tok, proc, cfg, rank=0, world_size=1, micro_batch_size=micro, n_image_tokens=1, seed=0)
    L.set_stage(1)
    t = time.perf_counter()
    n = sum(len(b["keys"]) for b in L)
    return n / (time.perf_counter() - t)


def breakdown(spec, tok, proc, n: int = 200) -> dict:
    """ms per sample for each stage, in-process."""
    from mmcoconut.data.curriculum import build_example
    from mmcoconut.modeling.tokens import SpecialIds
    raws = []
    for raw in wds.tariterators.tarfile_samples([{"url": spec + "-000000.tar"}]):
        raws.append(raw)
        if len(raws) == n:
            break
    size = proc.crop_size["height"]
    out, imgs = {}, []

    def timed(name, fn):
        t = time.perf_counter()
        res = [fn(r) for r in raws]
        out[name] = 1000 * (time.perf_counter() - t) / len(raws)
        return res

    def draft(r):
        im = Image.open(io.BytesIO(r["jpg"]))
        im.draft("RGB", (size, size))
        return im.convert("RGB")

    imgs = timed("decode_full", lambda r: Image.open(io.BytesIO(r["jpg"])).convert("RGB"))
    timed("decode_draft", draft)
    idx = {id(r): i for i, r in enumerate(raws)}
    timed("processor", lambda r: proc(images=imgs[idx[id(r)]], return_tensors="pt"))
    fast = FastClipPreprocess.build(proc)
    timed("fast_preprocess", lambda r: fast(imgs[idx[id(r)]]))
    ids = SpecialIds.from_tokenizer(tok)
    cfg = Config()
    timed("json+tokenize", lambda r: build_example(json.loads(r["json"]), tok, ids, view="train", stage=1,
                                                   cur=cfg.curriculum, n_image_tokens=1, rng=None, max_length=512,
                                                   key="k"))
    return out


class HTTPServer:
    """`python -m http.server` over `root` on a free local port, in its own process."""

    def __init__(self, root: str):
        import socket
        import subprocess
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                      "--directory", root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("http.server did not start")

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def raw_rate(spec) -> tuple[float, float]:
    """(samples/s, MB/s) of reading the tar samples alone (ShardReader: open, stream, split; no decode)."""
    from mmcoconut.data.pipeline import SkipCounter
    from mmcoconut.data.shardlist import ShardReader, expand_shards
    urls = expand_shards(spec)
    t, n, nbytes = time.perf_counter(), 0, 0
    for raw in ShardReader(SkipCounter()).read(urls):
        n += 1
        nbytes += sum(len(v) for k, v in raw.items() if not k.startswith("__"))
    dt = time.perf_counter() - t
    return n / dt, nbytes / dt / 1e6


def url_table(spec, tok, proc, workers: list[int], repeats: int, extra: str | None, n_shards: int) -> None:
    """samples/s: local disk vs local HTTP server vs pipe:cat (vs --url SPEC), interleaved repeats; first the
    tar read alone, then one full loader epoch (decode + preprocess + collate) per num_workers."""
    import statistics
    root = os.path.dirname(spec)
    server = HTTPServer(root)
    try:
        sources = {"local disk": spec, "http (local http.server)": f"http://127.0.0.1:{server.port}/train",
                   "pipe:cat": f"pipe:cat {root}/train-{{000000..{n_shards - 1:06d}}}.tar"}
        if extra:
            sources[f"--url {extra}"] = extra
        raw = {name: [] for name in sources}
        rates = {(name, w): [] for name in sources for w in workers}
        for _ in range(repeats):  # interleaved, so that load changes on a shared box hit every source alike
            for name, src in sources.items():
                raw[name].append(raw_rate(src))
            for w in workers:
                for name, src in sources.items():
                    rates[name, w].append(epoch_rate(src, tok, proc, w))
    finally:
        server.close()
    print("| source | stage | num_workers | samples/s median | min | max | MB/s median |")
    print("|---|---|---|---|---|---|---|")
    for name, r in raw.items():
        sps = [x[0] for x in r]
        print(f"| {name} | tar read only | 0 | {statistics.median(sps):.0f} | {min(sps):.0f} | {max(sps):.0f} | "
              f"{statistics.median(x[1] for x in r):.1f} |")
    for (name, w), r in rates.items():
        print(f"| {name} | full loader epoch | {w} | {statistics.median(r):.0f} | {min(r):.0f} | {max(r):.0f} | |",
              flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--photo", action="store_true")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--torch-threads", type=int, default=1, help="main-process torch threads (workers use 1)")
    ap.add_argument("--url", nargs="?", const="", default=None, metavar="SPEC",
                    help="compare local disk / local HTTP server / pipe:cat (64 px processor); SPEC: also this one")
    ap.add_argument("--repeats", type=int, default=3, help="--url: interleaved repeats per source")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.torch_threads)
    from transformers import AutoTokenizer, CLIPImageProcessor
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_tiny_models(os.path.join(tmp, "tiny"), "demo")
        tok = AutoTokenizer.from_pretrained(dirs["lm"])
        procs = {"demo-64px": CLIPImageProcessor.from_pretrained(dirs["vision"]), "clip-224px": CLIPImageProcessor()}
        os.makedirs(os.path.join(tmp, "shards"))
        spec = write_shards(os.path.join(tmp, "shards"), args.samples, args.shards, args.photo)
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                   platform.processor())
        print(f"# {args.samples} samples ({'640x480 photo-like' if args.photo else '224px synthetic'} JPEG), "
              f"nproc={os.cpu_count()}, {cpu}")
        print(f"# command: .venv/bin/python bench/bench_loader.py --samples {args.samples} --shards {args.shards}"
              f"{' --photo' if args.photo else ''} --torch-threads {args.torch_threads}"
              + ("" if args.url is None else f" --url {args.url}".rstrip() + f" --repeats {args.repeats} "
                 f"--workers {args.workers}"))
        print(f"# load average before: {os.getloadavg()}")
        if args.url is not None:
            url_table(spec, tok, procs["demo-64px"], [int(x) for x in args.workers.split(",")], args.repeats,
                      args.url or None, args.shards)
            print(f"# load average after: {os.getloadavg()}")
            return
        print("| processor | num_workers | samples/s | samples/s per core |")
        print("|---|---|---|---|")
        for pname, proc in procs.items():
            for w in (int(x) for x in args.workers.split(",")):
                rate = epoch_rate(spec, tok, proc, w)
                print(f"| {pname} | {w} | {rate:.0f} | {rate / max(1, w):.0f} |", flush=True)
        for pname, proc in procs.items():
            ms = breakdown(spec, tok, proc)
            print(f"# ms/sample ({pname}): " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))


if __name__ == "__main__":
    main()
