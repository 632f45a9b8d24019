"""Training glue without processes: LR schedule, argument spellings, resume planning, tracking, optimizer reset."""
import json
import subprocess
import sys

import pytest
import torch

from mmcoconut.config import ConfigError, load_config
from mmcoconut.cli.train import parse_args
from mmcoconut.train.checkpoint.index import INDEX, META
from mmcoconut.train.checkpoint.resume import find_resume
from mmcoconut.train.schedule import lr_factor
from mmcoconut.train.tracking import Tracker, read_metrics, wandb_mode


def test_lr_schedule_shapes():
    kw = dict(total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(60, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_factor(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(60, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_factor(100, schedule="constant", **kw) == 1.0


@pytest.mark.parametrize("argv", [
    ["--local_rank=1", "demo", "--lr=1e-3", "--deepspeed", "ds_configs/zero2_2gpu.json"],
    ["demo", "--deepspeed", "--deepspeed_config", "ds_configs/zero2_2gpu.json", "--local_rank", "1", "--lr=1e-3"],
    ["demo", "--deepspeed_config=ds_configs/zero2_2gpu.json", "--lr", "1e-3"],
])
def test_argument_spellings(argv):
    config, ds, rest = parse_args(argv)
    assert config == "demo" and ds == "ds_configs/zero2_2gpu.json" and rest[0].startswith("--lr")


def test_bad_override_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mmcoconut.train", "demo", "--train.lrr=1"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "did you mean" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _fake_run(tmp_path, tags):
    run = tmp_path / "run"
    for i, (tag, world, zero) in enumerate(tags):
        (run / tag).mkdir(parents=True)
        (run / tag / META).write_text(json.dumps({"tag": tag, "world_size": world, "zero_stage": zero,
                                                  "step": i + 1, "epoch": 0, "micro_batch_size": 4}))
    (run / INDEX).write_text(json.dumps([t for t, _, _ in tags]))
    return run


def test_find_resume(tmp_path):
    cfg = load_config(None, [f"--logging.run_dir={tmp_path / 'run'}"])
    assert find_resume(cfg, 2, 2) is None  # auto, nothing there: fresh start
    _fake_run(tmp_path, [("step00000002", 2, 2), ("epoch001", 2, 2)])
    assert find_resume(cfg, 2, 2).tag == "epoch001"
    cfg.checkpoint.resume = 1
    assert find_resume(cfg, 2, 2).tag == "epoch001"
    cfg.checkpoint.resume = 0
    assert find_resume(cfg, 2, 2) is None
    cfg.checkpoint.resume = "step00000002"
    assert not find_resume(cfg, 2, 1).universal  # ZeRO-1 <-> 2 share the format
    with pytest.raises(ConfigError, match="ZeRO-3 and ZeRO-1/2"):
        find_resume(cfg, 2, 3)
    with pytest.raises(ConfigError, match="python -m mmcoconut.cli.universal"):
        find_resume(cfg, 1, 2)  # world size changed, not converted yet
    (tmp_path / "run" / "step00000002_universal" / "zero").mkdir(parents=True)
    assert find_resume(cfg, 1, 2).universal
    cfg.checkpoint.resume = 7
    with pytest.raises(ConfigError, match="epoch007"):
        find_resume(cfg, 2, 2)


def test_wandb_mode_precedence(monkeypatch, tmp_path):
    cfg = load_config(None, [])
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(cfg) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(cfg) == "online"
    cfg.logging.wandb_mode = "disabled"
    assert wandb_mode(cfg) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(cfg) == "offline"


def test_tracker_metrics_and_wandb_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(None, [f"--logging.run_dir={tmp_path / 'run'}", "--logging.report_to=wandb"])
    tr = Tracker(cfg, rank=0)
    tr.log("train", step=1, epoch=0, stage=0, loss=float("nan"), lr=1e-3)
    tr.close()
    assert read_metrics(tmp_path / "run", "train")[0]["loss"] is None  # NaN -> null, still valid JSON
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert not Tracker(cfg, rank=1).enabled


def test_reset_optimizer_state_matches_fresh_adamw():
    from mmcoconut.train.engines.base import reset_adam_state
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.randn(4)
        opt.step()
    reset_adam_state(opt)
    q = torch.nn.Parameter(p.detach().clone())
    fresh = torch.optim.AdamW([q], lr=0.1)
    g = torch.randn(4)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    fresh.step()
    assert torch.allclose(p, q)


def test_find_resume_survives_a_torn_index(tmp_path, capsys):
    cfg = load_config(None, [f"--logging.run_dir={tmp_path / 'run'}"])
    run = _fake_run(tmp_path, [("step00000002", 2, 2), ("epoch001", 2, 2)])
    (run / INDEX).write_text('["step0000')  # a torn write: every later start used to die on a JSONDecodeError
    assert find_resume(cfg, 2, 2).tag == "epoch001"
    assert "unreadable (torn write?)" in capsys.readouterr().err


def test_to_device_moves_tensors_and_objects_with_to():
    from mmcoconut.train.batches import to_device

    class Plan:
        def to(self, device, non_blocking=False):
            self.moved = (str(device), non_blocking)
            return self

    plan = Plan()
    out = to_device({"pixel_values": torch.ones(2, 3), "input_ids": torch.ones(2, 3, dtype=torch.long),
                      "keys": ["a", "b"], "plan": plan}, torch.device("cpu"), torch.float16)
    assert out["pixel_values"].dtype == torch.float16 and out["input_ids"].dtype == torch.long
    assert out["keys"] == ["a", "b"] and out["plan"] is plan and plan.moved == ("cpu", True)


@pytest.mark.parametrize("when,due", [("epoch", [1, 1, 1, 1, 1, 1]), ("stage_end", [0, 0, 1, 0, 1, 1]),
                                      ("never", [0, 0, 0, 0, 0, 0])])
def test_val_accuracy_schedule(when, due):
    """stage 0 for 3 epochs, then 2 epochs per stage up to stage 1, then the run ends one epoch into stage 2"""
    from mmcoconut.train.validate import val_accuracy_due
    cfg = load_config(data={"curriculum": {"stage0_epochs": 3, "epochs_per_stage": 2, "max_latent_stage": 2},
                            "train": {"num_epochs": 6}, "eval": {"val_accuracy": when}})
    assert [int(val_accuracy_due(cfg, e)) for e in range(6)] == due


def test_latent_lr_ratio_from_stage_one():
    from types import SimpleNamespace
    from mmcoconut.train.schedule import make_scheduler_factory
    t = SimpleNamespace(warmup_steps=0, lr_schedule="constant", min_lr_ratio=0.1, latent_lr_ratio=0.25)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=4e-4)
    sched = make_scheduler_factory(t, 100, lambda step: 0 if step < 10 else 1 + (step - 10) // 5)(opt)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == [pytest.approx(4e-4)] * 10 and lrs[10:] == [pytest.approx(1e-4)] * 10
    t.latent_lr_ratio = 1.0
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=4e-4)
    make_scheduler_factory(t, 100, lambda step: 3)(opt2)
    assert opt2.param_groups[0]["lr"] == pytest.approx(4e-4)


def test_fsdp2_batch_and_precision_come_from_the_run_config():
    from mmcoconut.train.engines.fsdp_config import fsdp_spec
    s = fsdp_spec(load_config(None, ["--train.engine=fsdp2"]), 2)
    assert (s.micro_batch_size, s.accumulation, s.global_batch_size, s.precision) == (4, 1, 8, "fp32")
    cfg = load_config(None, ["--train.engine=fsdp2", "--train.micro_batch_size=2", "--train.global_batch_size=8",
                             "--train.precision=bf16"])
    assert [fsdp_spec(cfg, w).accumulation for w in (1, 2, 4)] == [4, 2, 1] and fsdp_spec(cfg, 2).precision == "bf16"
    with pytest.raises(ConfigError, match="not divisible by micro 2 x world 3"):
        fsdp_spec(cfg, 3)
    with pytest.raises(ConfigError, match="set only two of the three"):
        fsdp_spec(load_config(None, ["--train.engine=fsdp2", "--train.global_batch_size=8",
                                     "--train.gradient_accumulation_steps=3"]), 2)
    with pytest.raises(ConfigError, match="hysteresis is DeepSpeed's"):
        fsdp_spec(load_config(None, ["--train.engine=fsdp2", "--train.hysteresis=2"]), 2)
    with pytest.raises(ConfigError, match="train.global_batch_size must be >= 1, and only with train.engine=fsdp2"):
        load_config(None, ["--train.global_batch_size=8"])  # DeepSpeed: the ds_config's train_batch_size


def test_a_checkpoint_of_the_other_engine_is_refused(tmp_path):
    _fake_run(tmp_path, [("epoch001", 2, 2)])  # META without "engine": written by DeepSpeed
    cfg = load_config(None, [f"--logging.run_dir={tmp_path / 'run'}", "--train.engine=fsdp2"])
    with pytest.raises(ConfigError, match="saved by the deepspeed engine; it cannot be resumed with train.engine="
                                          "fsdp2"):
        find_resume(cfg, 2, None, 4)
    cfg.train.engine = "deepspeed"
    assert find_resume(cfg, 2, 2, 4).tag == "epoch001"
