"""Typed run configuration: YAML file -> dataclasses, `--key=value` / `--section.key=value` overrides.

Each field is `name: type = default  # one-line doc` (config_help.py renders --help and docs/configuration.md from
these lines); choices are `Literal` types. Values are checked against the field types by pydantic (strict: no
silent casts), then `validate()` runs every check that needs only the config, cross-field ones included, before
anything is built. Unknown keys and wrong types are errors naming the key (and the file). The seed project's flat
keys are translated by seed_config.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from .seed_config import (SEED_KEYS, SeedValueError, check_seed_values, is_translated, seed_defaults, seed_form_keys,
                          seed_target, translate)

View = Literal["nocot", "cot", "coconut", "dummy"]  # generation views (mmcoconut.eval)
Switch = Literal["auto", "on", "off"]  # auto: decided where it applies; YAML true/false (and on/off) read as on/off
VIEWS = typing.get_args(View)


@dataclass
class ModelConfig:
    lm_id: str = "gpt2"  # hub id or local dir of a causal LM: GPT-2, Llama (3.x, SmolLM2), Qwen2/2.5 or Mistral
    vision_id: str = "openai/clip-vit-base-patch32"  # hub id or local dir of a CLIP or SigLIP (vision) checkpoint
    tokenizer_id: Optional[str] = None  # default: lm_id
    image_tokens: Literal["pooled", "patches"] = "pooled"  # one pooled token, or patch tokens (CLS dropped)
    vision_layer: int = -2  # hidden layer used for patch tokens (LLaVA: -2)
    projector: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"  # vision -> LM projector (LLaVA's names)
    freeze_vision: bool = True  # keep the vision tower frozen (not trained, not in the optimizer)
    new_token_init: str = "<<"  # new special-token rows start from this token's embedding (Coconut); "" = mean
    max_length: int = 512  # after image and latent expansion; longer samples are an error naming the key
    init_from: Optional[str] = None  # start from these weights: an export, a DeepSpeed checkpoint or a state-dict file
    latent_scale: Literal["none", "embedding"] = "none"  # latent input: hidden state as is | at mean embedding norm


@dataclass
class DataConfig:
    train_shards: str = ""  # dir, dir/train, brace pattern, https:// or s3:// URL, pipe:CMD; '::' joins several
    val_shards: str = ""  # validation shards, same forms as train_shards ("": no validation)
    samples_per_epoch: Optional[int] = None  # default: from sizes.json next to the shards (fetched for URLs)
    shuffle_buffer: int = 1000  # samples in the shuffle buffer of each loader worker
    resampled: bool = False  # draw shards with replacement per rank and worker (fewer shards than ranks x workers)
    num_workers: int = 2  # DataLoader worker processes per rank
    overlong: Literal["error", "skip"] = "error"  # what to do with sequences over model.max_length
    choices_in_question: Optional[bool] = None  # questions list their choices (prompt format); None: from the shards
    max_skip_fraction: Optional[float] = 0.05  # stop when this fraction of training samples was skipped (None: never)
    shard_retries: int = 3  # re-open a shard that fails or breaks mid-stream this often, then skip it (counted)
    shard_retry_wait: float = 1.0  # seconds before the first retry; doubles per retry (jittered, at most 60)
    shard_timeout: float = 60.0  # seconds an http(s) or pipe: read may wait for data before it counts as failed


@dataclass
class CurriculumConfig:
    coconut: bool = True  # False: plain CoT training (no latents, no markers)
    no_cot: bool = False  # train on answers only
    c_thought: int = 2  # latent tokens per replaced reasoning step
    max_latent_stage: int = 3  # last curriculum stage: at most this many steps become latents
    epochs_per_stage: int = 1  # epochs per curriculum stage
    stage0_epochs: Optional[int] = None  # epochs of stage 0 (CoT) before stage 1; None: epochs_per_stage
    pad_latent_to_max: bool = False  # samples with fewer steps still get max_latent_stage * c_thought latents
    uniform_prob: float = 0.0  # probability of drawing a random stage for a sample (Coconut)
    reset_optimizer: bool = True  # reset optimizer state at each stage change (Coconut)


@dataclass
class TrainConfig:
    name: str = "mmcoconut"  # run name: run dir, checkpoint dir, wandb run
    seed: int = 42  # seeds Python, NumPy, torch and the data order
    num_epochs: int = 6  # epochs in all, every curriculum stage included
    engine: Literal["deepspeed", "fsdp2"] = "deepspeed"  # DeepSpeed ZeRO (+ ds_config) or PyTorch FSDP2 (run config)
    micro_batch_size: Optional[int] = None  # per-GPU batch; default: the ds_config's (fsdp2: 4)
    gradient_accumulation_steps: Optional[int] = None  # default: the ds_config's (fsdp2: from global_batch_size or 1)
    global_batch_size: Optional[int] = None  # fsdp2: micro x accumulation x world (accumulation derived from it)
    lr: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up steps
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"  # after warm-up
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at lr x this
    latent_lr_ratio: float = 1.0  # lr x this from curriculum stage 1 on (stage of the optimizer step; Coconut: 1)
    grad_clip: float = 1.0  # gradient-norm clipping
    max_steps_per_epoch: Optional[int] = None  # cap optimizer steps per epoch (short runs, debugging)
    log_every: int = 10  # optimizer steps between metrics records
    max_nonfinite_steps: int = 5  # this many optimizer steps in a row with a NaN/inf loss stop the run
    deepspeed_config: str = ""  # set by --deepspeed; default: ds_configs/ file for the world size
    precision: Optional[Literal["fp32", "fp16", "bf16"]] = None  # override the ds_config's (fsdp2: default fp32)
    initial_scale_power: Optional[int] = None  # fp16 dynamic loss scaling overrides
    loss_scale_window: Optional[int] = None  # fp16: steps without overflow before the scale doubles
    hysteresis: Optional[int] = None  # fp16: overflows tolerated before the scale halves (deepspeed only)
    min_loss_scale: Optional[float] = None  # fp16: the scale never goes below this
    compile: Switch = "auto"  # torch.compile the latent passes, fullgraph; auto: CUDA on, CPU off; true/false: on/off
    deferred_wgrad: bool = True  # eager latent passes: projection weight gradients summed in place, one per micro-batch
    gradient_checkpointing: bool = False  # recompute each decoder layer of each pass in backward (less memory)
    fsdp_reshard_after_forward: bool = True  # fsdp2: free a block's gathered weights after its forward (False: keep)


@dataclass
class CheckpointConfig:
    save_dir: str = "checkpoints"  # run dirs are <save_dir>/<train.name>
    save_every_steps: int = 0  # 0: only at epoch ends
    save_every_minutes: float = 0.0  # also save when this much time passed since the last save (0: off)
    keep_last: int = 3  # newest checkpoints kept
    resume: Union[int, str] = "auto"  # auto | none | <tag> | <epoch number> (seed: 0 = fresh start)
    allow_config_change: list[str] = field(default_factory=list)  # keys that may differ from the resumed run's
    export_final: bool = False  # after the last epoch write <run dir>/export (Hugging Face dir) from the live engine


@dataclass
class LoggingConfig:
    project: str = "mmcoconut"  # wandb project
    entity: Optional[str] = None  # wandb entity (team); default: yours
    report_to: Literal["wandb", "none"] = "wandb"  # metrics.jsonl is always written
    wandb_mode: Optional[Literal["online", "offline", "disabled"]] = None  # default: env / key
    run_dir: Optional[str] = None  # default: <save_dir>/<name>


@dataclass
class EvalConfig:
    views: list[View] = field(default_factory=lambda: list(VIEWS))  # mmcoconut.eval's views
    batch_size: int = 16  # generation batch per rank
    max_new_tokens: int = 64  # generation budget (steps + answer)
    val_samples: Optional[int] = 256  # per-stage validation budget during training (None: all)
    val_every_epoch: bool = True  # validate (loss + accuracy) after every epoch
    val_accuracy: Literal["epoch", "stage_end", "never"] = "epoch"  # when validation also generates: MC/DA
    dummy_latent: Literal["zeros", "random"] = "zeros"  # what the dummy view puts in the latent slots
    annotations: Optional[str] = None  # official annotation json = the expected question set (default: the shards)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def run_dir(self) -> str:
        return self.logging.run_dir or str(Path(self.checkpoint.save_dir) / self.train.name)




class ConfigError(ValueError):
    pass


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def _section_fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


FIELDS = {s: _section_fields(cls) for s, cls in SECTIONS.items()}
_FLAT: dict[str, list[str]] = {}
for _s, _fs in FIELDS.items():
    for _k in _fs:
        _FLAT.setdefault(_k, []).append(f"{_s}.{_k}")


def short_key_candidates(key: str) -> list[str]:
    """Dotted keys a bare `key` could mean: exact field names in any section, plus fields whose name ends in
    `_<key>` (`batch_size` could be eval.batch_size or train.micro_batch_size)."""
    exact = _FLAT.get(key, [])
    near = sorted(f"{s}.{k}" for s, fs in FIELDS.items() for k in fs if k.endswith("_" + key))
    return exact + near


def resolve_key(key: str, where: str) -> tuple[str, str]:
    """'lr' / 'train.lr' / a seed key -> (section, field). Unknown, ambiguous or surprising keys raise ConfigError:
    a bare key works only when it names exactly one field and no other field ends with it."""
    key = seed_target(key) or key
    if "." not in key:
        cands = short_key_candidates(key)
        if len(cands) > 1:
            raise ConfigError(f"{where}: key {key!r} is ambiguous; write one of {cands}")
        if cands:
            key = cands[0]
    section, _, name = key.partition(".")
    if section in FIELDS and name in FIELDS[section]:
        return section, name
    known = [f"{s}.{k}" for s, fs in FIELDS.items() for k in fs] + list(SEED_KEYS)
    hint = difflib.get_close_matches(key, known, n=3)
    raise ConfigError(f"{where}: unknown config key {key!r}" + (f"; did you mean {hint}?" if hint else ""))


def _admits(tp, kind) -> bool:
    """Whether type `tp` (or an arm of its Optional/Union) is `kind` (float, list)."""
    arms = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
    return any(a is kind or typing.get_origin(a) is kind for a in arms)


def type_name(tp) -> str:
    """int, float | None, str (a, b), list[str (a, b)]: how --help and the errors name a field type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " | ".join(type_name(a) for a in args if a is not type(None)) + \
            (" | None" if type(None) in args else "")
    if origin is Literal:
        return f"{type(args[0]).__name__} (" + ", ".join(map(str, args)) + ")"
    if origin is list:
        return f"list[{type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


@functools.lru_cache(maxsize=None)
def _adapter(tp) -> TypeAdapter:
    return TypeAdapter(tp, config=ConfigDict(strict=True))


def _typed(value: Any, tp, where: str) -> Any:
    """`value` as field type `tp` (strict: no silent casts) or ConfigError. Three spellings are read first: a float
    YAML 1.1 leaves as a string ("5e-5"), a comma-separated list from the command line ("cot,coconut") and a bool
    for an auto/on/off switch (true: on)."""
    if isinstance(value, str) and _admits(tp, float):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and typing.get_origin(tp) is Literal and {"on", "off"} <= set(typing.get_args(tp)):
        value = "on" if value else "off"  # a switch written as a bool (older configs; YAML 1.1 reads on/off so)
    if isinstance(value, str) and _admits(tp, list):
        value = [v for v in value.split(",") if v]
    if typing.get_origin(tp) is list and typing.get_origin(typing.get_args(tp)[0]) is Literal \
            and isinstance(value, list):
        choices = typing.get_args(typing.get_args(tp)[0])
        bad = [v for v in value if v not in choices]
        if bad:
            raise ConfigError(f"{where}: unknown {bad}; choose from {list(choices)}")
    try:
        return _adapter(tp).validate_python(value)
    except ValidationError as e:
        literal = next((a for a in (tp, *typing.get_args(tp)) if typing.get_origin(a) is Literal), None)
        if literal is not None and isinstance(value, type(typing.get_args(literal)[0])):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(literal))}") from None
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r} ({type(value).__name__}): "
                          f"{e.errors()[0]['msg']}") from None


def _set(cfg: Config, key: str, value: Any, where: str) -> None:
    section, name = resolve_key(key, where)
    value = _typed(value, FIELDS[section][name].type, f"{where}: {section}.{name}")
    setattr(getattr(cfg, section), name, value)


def _apply_mapping(cfg: Config, data: dict, where: str) -> None:
    try:
        check_seed_values(data, where)
    except SeedValueError as e:
        raise ConfigError(str(e)) from None
    # a seed config: what it leaves out has the seed's meaning; cfg.seed_keys / cfg.notes are read by the trainer
    cfg.seed_keys = getattr(cfg, "seed_keys", set()) | set(seed_form_keys(data, _FLAT))
    defaults, notes = seed_defaults(data, _FLAT, where) if where != "command line" else ([], [])
    cfg.notes = getattr(cfg, "notes", []) + notes
    for key, value in defaults:  # first: any key the config spells out wins over what it leaves to the default
        _set(cfg, key, value, where)
    later = []
    for key, value in data.items():
        if key in FIELDS and isinstance(value, dict):
            for sub, v in value.items():
                _set(cfg, f"{key}.{sub}", v, where)
        elif key in FIELDS and value is None:
            continue  # empty section
        elif is_translated(key):
            later.append((key, value))  # after the plain keys: `cot: true` wins over `coconut: false` order
        else:
            _set(cfg, str(key), value, where)
    for key, value in later:
        try:
            pairs = translate(key, value, f"{where}: {key}")
        except SeedValueError as e:
            raise ConfigError(str(e)) from None
        for k, v in pairs:
            _set(cfg, k, v, f"{where}: {key}")


def find_config(path_or_name: str) -> Path:
    """A path, or the name of a config shipped in mmcoconut/configs (with or without .yaml)."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    shipped = resources.files("mmcoconut") / "configs" / f"{stem}.yaml"
    if p.parent == Path(".") and shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"config {path_or_name!r}: no such file, and not a shipped config ({shipped_configs()})")


def shipped_configs() -> list[str]:
    return sorted(x.name[:-5] for x in (resources.files("mmcoconut") / "configs").iterdir()
                  if x.name.endswith(".yaml"))


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """['--train.lr=1e-4', '--lr', '3e-4', '--coconut=false'] -> [(key, yaml value), ...]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: expected --key=value, got {arg!r}")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"command line: --{key} needs a value (--{key}=VALUE)")
            raw, i = args[i + 1], i + 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
        i += 1
    return out


def load_config(path_or_name: Optional[str] = None, overrides: Optional[list[str]] = None,
                data: Optional[dict] = None) -> Config:
    """Defaults <- YAML file (or dict) <- command-line overrides, then validate(). Raises ConfigError."""
    cfg = Config()
    if path_or_name:
        path = find_config(path_or_name)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at top level")
        _apply_mapping(cfg, loaded, str(path))
    if data:
        _apply_mapping(cfg, data, "config dict")
    for key, value in parse_overrides(overrides or []):
        if is_translated(key):
            _apply_mapping(cfg, {key: value}, "command line")
        else:
            _set(cfg, key, value, f"--{key}")
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config saved with to_dict() (e.g. from a checkpoint)."""
    return load_config(data=d)


def validate(cfg: Config) -> None:
    """Every check that needs only the config (ranges and cross-field rules), in one pass; the first problem is one
    ConfigError naming the key. Checks that need the data, the ds_config or the world size: train/preflight.py."""
    t, c, d, ck = cfg.train, cfg.curriculum, cfg.data, cfg.checkpoint
    rules = [
        ("train.lr", t.lr, math.isfinite(t.lr) and t.lr > 0, "> 0"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
        ("train.grad_clip", t.grad_clip, t.grad_clip >= 0, ">= 0 (0: no clipping)"),
        ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
        ("train.min_lr_ratio", t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
        ("train.num_epochs", t.num_epochs, t.num_epochs >= 1, ">= 1"),
        ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
        ("train.max_steps_per_epoch", t.max_steps_per_epoch, t.max_steps_per_epoch is None
         or t.max_steps_per_epoch >= 1, ">= 1 (or unset)"),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps, t.max_nonfinite_steps >= 1, ">= 1"),
        ("train.micro_batch_size", t.micro_batch_size, t.micro_batch_size is None or t.micro_batch_size >= 1,
         ">= 1"),
        ("train.gradient_accumulation_steps", t.gradient_accumulation_steps, t.gradient_accumulation_steps is None
         or t.gradient_accumulation_steps >= 1, ">= 1"),
        ("train.global_batch_size", t.global_batch_size, t.global_batch_size is None or (
            t.global_batch_size >= 1 and t.engine == "fsdp2"), ">= 1, and only with train.engine=fsdp2 (DeepSpeed: "
         "the ds_config's train_batch_size)"),
        ("checkpoint.save_every_steps", ck.save_every_steps, ck.save_every_steps >= 0, ">= 0 (0: epoch ends only)"),
        ("checkpoint.save_every_minutes", ck.save_every_minutes, ck.save_every_minutes >= 0, ">= 0 (0: off)"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
        ("data.samples_per_epoch", d.samples_per_epoch, d.samples_per_epoch is None or d.samples_per_epoch >= 1,
         ">= 1 (or unset: from sizes.json)"),
        ("data.max_skip_fraction", d.max_skip_fraction, d.max_skip_fraction is None
         or 0.0 <= d.max_skip_fraction <= 1.0, "in [0, 1] (or null for no limit)"),
        ("model.max_length", cfg.model.max_length, cfg.model.max_length >= 8, ">= 8"),
        ("curriculum.epochs_per_stage", c.epochs_per_stage, c.epochs_per_stage >= 1, ">= 1"),
        ("curriculum.stage0_epochs", c.stage0_epochs, c.stage0_epochs is None or c.stage0_epochs >= 1, ">= 1"),
        ("curriculum.max_latent_stage", c.max_latent_stage, c.max_latent_stage >= 0, ">= 0"),
        ("curriculum.uniform_prob", c.uniform_prob, 0.0 <= c.uniform_prob <= 1.0, "in [0, 1]"),
        ("curriculum.c_thought", c.c_thought, c.c_thought >= 0 and not (
            c.coconut and not c.no_cot and c.max_latent_stage > 0 and c.c_thought < 1),
         f">= 1 for a coconut curriculum with latent stages (max_latent_stage {c.max_latent_stage})"),
    ]
    for key, value, ok, want in rules:
        if not ok:
            raise ConfigError(f"{key} must be {want}, got {value}")
    if t.compile == "on" and t.gradient_checkpointing:  # auto resolves off with them (engines/base.py)
        raise ConfigError("train.compile=on and train.gradient_checkpointing=true do not go together (the "
                          "checkpointed layers' recomputation is not compiled); pick one")
    for key in ck.allow_config_change:
        resolve_key(key, "checkpoint.allow_config_change")
