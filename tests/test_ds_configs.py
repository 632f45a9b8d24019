"""ds_configs/*.json: concrete batch arithmetic for their world size, one global batch, precision blocks; and
the run-config overrides / world-size validation applied onto them (no processes started)."""
import json
import re
from pathlib import Path

import pytest

from mmcoconut.config import ConfigError, load_config
from mmcoconut.train.engines.ds_config import FP16_DEFAULTS, resolve_ds_config

DIR = Path(__file__).resolve().parents[1] / "ds_configs"
FILES = sorted(DIR.glob("*.json"))
FAMILIES = ("zero0", "zero1", "zero2", "zero3", "zero3_offload", "zero1_bf16")
GLOBAL_BATCH = 128  # Coconut's global batch; micro-batches from mmcoconut/sizing.py (tests/test_sizing.py)


@pytest.fixture(autouse=True)
def _cpu_fp16(monkeypatch):
    monkeypatch.setenv("MMCOCONUT_CPU_FP16", "1")  # this CPU may lack oneDNN fp16 (DeepSpeed refuses it)


def _load(p):
    return json.loads(p.read_text())


@pytest.mark.parametrize("path", FILES + sorted((DIR / "cpu").glob("*.json")), ids=lambda p: p.name)
def test_each_file_resolves_through_the_engine_for_its_world_size(path):
    """What the trainer does with `--deepspeed <file>` on <n> processes: the resolver accepts it (by path and by its
    shipped name) and hands DeepSpeed the file's batch arithmetic and ZeRO stage with the run config applied; on any
    other world size it refuses it with one line. Every family ships a file for 1, 2, 4 and 8 GPUs."""
    n = int(re.fullmatch(r".+_(\d+)gpu", path.stem).group(1))
    raw = _load(path)
    for ref in (str(path), path.stem if path.parent == DIR else None):
        if ref is None:
            continue
        ds = resolve_ds_config(_cfg("--train.lr=2e-4"), ref, world=n)
        assert ds["train_batch_size"] == raw["train_batch_size"]
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * n
        assert ds["zero_optimization"]["stage"] == raw["zero_optimization"]["stage"]
        assert ds["optimizer"]["params"]["lr"] == 2e-4
    other = 3 if n != 3 else 5
    with pytest.raises(ConfigError, match="does not fit"):
        resolve_ds_config(_cfg(), str(path), world=other)
    if path.parent == DIR:
        fam = path.stem.rsplit("_", 1)[0]
        assert {f"{fam}_{k}gpu.json" for k in (1, 2, 4, 8)} <= {p.name for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_is_concrete_and_fits_its_world_size(path):
    c = _load(path)
    fam, n = re.fullmatch(r"(.+)_(\d+)gpu", path.stem).groups()
    assert fam in FAMILIES
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert isinstance(c[k], int), k
    assert c["train_batch_size"] == GLOBAL_BATCH  # the same global batch everywhere
    assert c["train_batch_size"] == c["train_micro_batch_size_per_gpu"] * c["gradient_accumulation_steps"] * int(n)
    assert c["train_micro_batch_size_per_gpu"] >= (8 if fam == "zero3_offload" else 16)  # GPU-sized
    assert "auto" not in path.read_text()
    assert c["optimizer"]["type"] == "AdamW" and c["gradient_clipping"] > 0
    z = c["zero_optimization"]
    assert z["stage"] == {"zero0": 0, "zero1": 1, "zero2": 2, "zero1_bf16": 1}.get(fam, 3)
    if fam == "zero1_bf16":  # BF16_Optimizer: bf16 weights, fp32 gradient accumulation
        assert c["bf16"]["enabled"] and not c.get("fp16", {}).get("enabled")
        assert c["data_types"]["grad_accum_dtype"] == "fp32"
    else:
        assert c["fp16"] == FP16_DEFAULTS
    if z["stage"] == 3:
        assert z["stage3_gather_16bit_weights_on_model_save"] is True
    if int(n) == 1:
        assert not z.get("overlap_comm")  # no communication to overlap on one GPU
    if fam == "zero3_offload":
        assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("path", sorted((DIR / "cpu").glob("*.json")), ids=lambda p: p.name)
def test_cpu_files_keep_the_demo_batch(path):
    """ds_configs/cpu/ (launch.sh with NGPU=0): the CPU demo's global batch 32, micro 4."""
    c = _load(path)
    n = int(re.fullmatch(r"zero2_(\d+)gpu", path.stem).group(1))
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"]) == (32, 4)
    assert c["train_batch_size"] == 4 * c["gradient_accumulation_steps"] * n


def _cfg(*over):
    return load_config(None, list(over))


def test_overrides_applied():
    ds = resolve_ds_config(_cfg("--train.lr=3e-4", "--train.weight_decay=0.1", "--train.grad_clip=0.5",
                                "--train.hysteresis=1", "--train.initial_scale_power=8"),
                           str(DIR / "zero2_2gpu.json"), world=2)
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["gradient_clipping"] == 0.5
    assert ds["fp16"]["hysteresis"] == 1 and ds["fp16"]["initial_scale_power"] == 8


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_switch(precision):
    ds = resolve_ds_config(_cfg(f"--train.precision={precision}"), str(DIR / "zero1_bf16_2gpu.json"), world=2)
    assert ds["fp16"]["enabled"] == (precision == "fp16")
    assert ds["bf16"]["enabled"] == (precision == "bf16")


def test_micro_batch_rederives_accumulation():
    ds = resolve_ds_config(_cfg("--train.micro_batch_size=8"), str(DIR / "zero2_2gpu.json"), world=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 8)  # e.g. 2 x T4
    assert ds["train_batch_size"] == GLOBAL_BATCH
    with pytest.raises(ConfigError, match="not divisible"):
        resolve_ds_config(_cfg("--train.micro_batch_size=3"), str(DIR / "zero2_2gpu.json"), world=2)


def test_world_size_mismatch_names_the_fitting_file():
    with pytest.raises(ConfigError) as e:
        resolve_ds_config(_cfg(), str(DIR / "zero3_2gpu.json"), world=4)
    msg = str(e.value)
    assert "zero3_2gpu.json does not fit 4 process(es)" in msg and "zero3_4gpu.json" in msg
    assert "\n" not in msg


def test_default_file_and_missing_file():
    ds = resolve_ds_config(_cfg(), None, world=1)  # one GPU: ZeRO-0, no partitioning overhead
    assert ds["zero_optimization"]["stage"] == 0
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] == GLOBAL_BATCH
    assert resolve_ds_config(_cfg(), None, world=2)["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="no such file"):
        resolve_ds_config(_cfg(), "ds_configs/nope.json", world=1)


def test_train_switches_are_engine_arguments_not_ds_config_keys():
    """train.compile / train.deferred_wgrad reach the DeepSpeed engine as constructor arguments; the ds_config
    DeepSpeed reads holds nothing of mmcoconut's."""
    from mmcoconut.train.engines import create_engine
    from mmcoconut.train.engines.ds_config import deepspeed_spec
    plain = resolve_ds_config(_cfg(), str(DIR / "zero2_2gpu.json"), world=2)
    for over in ("--train.compile=true", "--train.deferred_wgrad=false"):
        assert resolve_ds_config(_cfg(over), str(DIR / "zero2_2gpu.json"), world=2) == plain
    cfg = _cfg("--train.compile=true", "--train.deferred_wgrad=false")
    engine = create_engine(deepspeed_spec(cfg, 2, str(DIR / "zero2_2gpu.json")), cfg)
    assert (engine.compile, engine.deferred_wgrad) == (True, False) and engine.ds_config == plain
    with pytest.raises(ConfigError, match="ZeRO-3"):
        resolve_ds_config(_cfg("--train.compile=true"), str(DIR / "zero3_2gpu.json"), world=2)
    # auto (the default) is not refused with ZeRO-3, and resolves off on this CPU machine
    resolve_ds_config(_cfg(), str(DIR / "zero3_2gpu.json"), world=2)
    cfg = _cfg()
    assert cfg.train.compile == "auto"
    assert create_engine(deepspeed_spec(cfg, 2, str(DIR / "zero2_2gpu.json")), cfg).compile is False


def test_compile_auto_resolves_from_the_device_type():
    """train.compile=auto: on for CUDA, off elsewhere; on CUDA off with one note under gradient checkpointing or
    ZeRO-3. on/off (and the old bools) stay as written. No GPU needed: the device type is an argument."""
    from mmcoconut.train.engines.base import resolve_compile
    assert resolve_compile("auto", "cuda") == (True, None)
    assert resolve_compile("auto", "cpu") == (False, None)
    assert resolve_compile("auto", "cpu", gradient_checkpointing=True, zero3=True) == (False, None)
    for kw, blocker in (({"gradient_checkpointing": True}, "train.gradient_checkpointing"),
                        ({"zero3": True}, "ZeRO-3")):
        on, note = resolve_compile("auto", "cuda", **kw)
        assert on is False and blocker in note and "train.compile=auto resolves off on CUDA" in note
    for device in ("cpu", "cuda"):
        assert resolve_compile("on", device) == resolve_compile(True, device) == (True, None)
        assert resolve_compile("off", device) == resolve_compile(False, device) == (False, None)
    with pytest.raises(ValueError, match="not one of"):
        resolve_compile("sometimes", "cuda")


def test_deepspeed_engine_resolves_compile_from_its_accelerator(monkeypatch):
    """The engine decides auto at construction from DeepSpeed's accelerator (CUDA faked here: nothing runs on it)."""
    import deepspeed.accelerator

    from mmcoconut.train.engines import create_engine
    from mmcoconut.train.engines.ds_config import deepspeed_spec

    class FakeCuda:
        def device_name(self):
            return "cuda"

    path = str(DIR / "zero2_2gpu.json")
    for over, want in ((), True), (("--train.compile=off",), False), (("--train.gradient_checkpointing=true",), False):
        cfg = _cfg(*over)
        spec = deepspeed_spec(cfg, 2, path)  # (checks this machine's accelerator)
        with monkeypatch.context() as m:
            m.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeCuda())
            engine = create_engine(spec, cfg)
        assert engine.compile is want, over
        notes = [n for n in engine.notes if "train.compile" in n]
        assert len(notes) == (1 if over and "gradient" in over[0] else 0), engine.notes
