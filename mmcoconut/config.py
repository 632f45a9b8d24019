"""Typed run configuration: YAML file -> dataclasses, `--key=value` / `--section.key=value` overrides.

Unknown keys and wrong types are errors. The seed project's flat config (name, model_id, train_path, ...)
loads unchanged: its keys are mapped onto the sections below (see SEED_KEYS).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import yaml


def _choice(default, *choices):
    return field(default=default, metadata={"choices": choices})


@dataclass
class ModelConfig:
    lm_id: str = "gpt2"  # hub id or local dir of a GPT-2 checkpoint
    vision_id: str = "openai/clip-vit-base-patch32"  # hub id or local dir of a CLIP (vision) checkpoint
    tokenizer_id: Optional[str] = None  # default: lm_id
    image_tokens: str = _choice("pooled", "pooled", "patches")  # one pooled token, or patch tokens (CLS dropped)
    vision_layer: int = -2  # hidden layer used for patch tokens (LLaVA: -2)
    projector: str = _choice("mlp2x_gelu", "linear", "mlp2x_gelu")  # vision -> LM projector (LLaVA's names)
    freeze_vision: bool = True  # keep the CLIP tower frozen (not trained, not in the optimizer)
    new_token_init: str = "<<"  # new special-token rows start from this token's embedding (Coconut); "" = mean
    max_length: int = 512  # after image and latent expansion; longer samples are an error naming the key
    init_from: Optional[str] = None  # start from these weights: an export, a DeepSpeed checkpoint or a state-dict file
    latent_scale: str = _choice("none", "none", "embedding")  # latent input: last hidden state as is | rescaled to the mean wte row norm


@dataclass
class DataConfig:
    train_shards: str = ""  # dir, dir/train, brace pattern, https:// or s3:// URL, pipe:CMD; '::' joins several
    val_shards: str = ""  # validation shards, same forms as train_shards ("": no validation)
    samples_per_epoch: Optional[int] = None  # default: from sizes.json next to the shards (fetched for URLs)
    shuffle_buffer: int = 1000  # samples in the shuffle buffer of each loader worker
    resampled: bool = False  # draw shards with replacement per rank and worker (fewer shards than ranks x workers)
    num_workers: int = 2  # DataLoader worker processes per rank
    overlong: str = _choice("error", "error", "skip")  # what to do with sequences over model.max_length
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
    micro_batch_size: Optional[int] = None  # per-GPU batch; default: the ds_config's train_micro_batch_size_per_gpu
    gradient_accumulation_steps: Optional[int] = None  # default: the ds_config's; global batch = micro x this x world
    lr: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up steps
    lr_schedule: str = _choice("cosine", "constant", "linear", "cosine")  # after warm-up
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at lr x this
    latent_lr_ratio: float = 1.0  # lr x this from curriculum stage 1 on (stage of the optimizer step; Coconut: 1)
    grad_clip: float = 1.0  # gradient-norm clipping
    max_steps_per_epoch: Optional[int] = None  # cap optimizer steps per epoch (short runs, debugging)
    log_every: int = 10  # optimizer steps between metrics records
    max_nonfinite_steps: int = 5  # this many optimizer steps in a row with a NaN/inf loss stop the run
    deepspeed_config: str = ""  # set by --deepspeed; default: ds_configs/ file for the world size
    precision: Optional[str] = _choice(None, None, "fp32", "fp16", "bf16")  # override the ds_config's
    initial_scale_power: Optional[int] = None  # fp16 dynamic loss scaling overrides
    loss_scale_window: Optional[int] = None  # fp16: steps without overflow before the scale doubles
    hysteresis: Optional[int] = None  # fp16: overflows tolerated before the scale halves
    min_loss_scale: Optional[float] = None  # fp16: the scale never goes below this
    compile: bool = False  # torch.compile the per-pass LM calls (CUDA: CUDA graphs for one-column passes); not ZeRO-3
    deferred_wgrad: bool = True  # eager latent passes: Conv1D weight gradients summed in place, one per micro-batch


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
    report_to: str = _choice("wandb", "wandb", "none")  # metrics.jsonl is always written
    wandb_mode: Optional[str] = _choice(None, None, "online", "offline", "disabled")  # default: env / key
    run_dir: Optional[str] = None  # default: <save_dir>/<name>


@dataclass
class EvalConfig:
    views: list[str] = field(default_factory=lambda: ["nocot", "cot", "coconut", "dummy"])  # mmcoconut.eval's views
    batch_size: int = 16  # generation batch per rank
    max_new_tokens: int = 64  # generation budget (steps + answer)
    val_samples: Optional[int] = 256  # per-stage validation budget during training (None: all)
    val_every_epoch: bool = True  # validate (loss + accuracy) after every epoch
    val_accuracy: str = _choice("epoch", "epoch", "stage_end", "never")  # when validation also generates: MC/DA
    dummy_latent: str = _choice("zeros", "zeros", "random")  # what the dummy view puts in the latent slots
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


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}

# The seed trainers' flat keys (facebookresearch/coconut args/*.yaml and the multimodal seed) -> our dotted keys.
# A callable maps a value to [(dotted key, value), ...] or raises ConfigError (a value mmcoconut cannot honour).
def _seed_false_only(key: str, hint: str):
    def apply(value, where):
        if value in (False, None, "None", 0):
            return []
        raise ConfigError(f"{where}: seed key {key}: {value!r} is not supported by mmcoconut ({hint})")
    return apply


def _seed_load_model_path(value, where):
    return [] if value in (None, "None", "none", "") else [("model.init_from", value)]


def _seed_cot(value, where):
    return [("curriculum.coconut", False)] if value is True else []


SEED_KEYS = {
    "name": "train.name", "model_id": "model.lm_id", "clip_id": "model.vision_id", "project": "logging.project",
    "seed": "train.seed", "train_path": "data.train_shards", "val_path": "data.val_shards",
    "save_path": "checkpoint.save_dir", "coconut": "curriculum.coconut", "no_cot": "curriculum.no_cot",
    "num_epochs": "train.num_epochs", "epochs_per_stage": "curriculum.epochs_per_stage",
    "c_thought": "curriculum.c_thought", "max_latent_stage": "curriculum.max_latent_stage",
    "pad_latent_to_max": "curriculum.pad_latent_to_max", "uniform_prob": "curriculum.uniform_prob",
    "reset_optimizer": "curriculum.reset_optimizer", "batch_size_training": "train.micro_batch_size",
    "batch_size_eval": "eval.batch_size", "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "lr": "train.lr", "weight_decay": "train.weight_decay", "resume": "checkpoint.resume",
    "load_model_path": _seed_load_model_path,
    "bf16": lambda value, where: [("train.precision", "bf16" if value is True else "fp32")],
    "cot": _seed_cot,
    "only_eval": _seed_false_only("only_eval", "evaluate with: mmcoconut-eval CKPT SHARDS"),
    "save_only_improve": _seed_false_only("save_only_improve", "the newest checkpoint.keep_last checkpoints are "
                                          "kept; pick one by validation accuracy in metrics.jsonl"),
    "no_thoughts": _seed_false_only("no_thoughts", "Coconut's w/o-thought ablation is not implemented"),
    "debug": _seed_false_only("debug", "for a short run use --logging.report_to=none --train.max_steps_per_epoch=N "
                              "--eval.val_samples=32"),
}
SEED_KEY_DOCS = {
    "load_model_path": "model.init_from (\"None\": none)", "bf16": "train.precision = bf16 (true) | fp32 (false)",
    "cot": "true: curriculum.coconut = false (plain CoT training)",
    "only_eval": "false only (true: use mmcoconut-eval)", "save_only_improve": "false only",
    "no_thoughts": "false only", "debug": "false only",
}


class ConfigError(ValueError):
    pass


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    cls = {"model": ModelConfig, "data": DataConfig, "curriculum": CurriculumConfig, "train": TrainConfig,
           "checkpoint": CheckpointConfig, "logging": LoggingConfig, "eval": EvalConfig}[section]
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


FIELDS = {s: _section_fields(s) for s in SECTIONS}
_FLAT = {}
for _s, _fs in FIELDS.items():
    for _k in _fs:
        _FLAT.setdefault(_k, []).append(f"{_s}.{_k}")


def _all_keys() -> list[str]:
    return [f"{s}.{k}" for s, fs in FIELDS.items() for k in fs] + list(SEED_KEYS)


def short_key_candidates(key: str) -> list[str]:
    """Dotted keys a bare `key` could mean: exact field names in any section, plus fields whose name ends in
    `_<key>` (`batch_size` could be eval.batch_size or train.micro_batch_size)."""
    exact = _FLAT.get(key, [])
    near = sorted(f"{s}.{k}" for s, fs in FIELDS.items() for k in fs if k.endswith("_" + key))
    return exact + near


def resolve_key(key: str, where: str) -> tuple[str, str]:
    """'lr' / 'train.lr' / seed key -> (section, field). Unknown, ambiguous or surprising keys raise ConfigError:
    a bare key works only when it names exactly one field and no other field ends with it."""
    target = SEED_KEYS.get(key)
    if isinstance(target, str):
        key = target
    if "." not in key:
        cands = short_key_candidates(key)
        if len(cands) > 1:
            raise ConfigError(f"{where}: key {key!r} is ambiguous; write one of {cands}")
        if cands:
            key = cands[0]
    section, _, name = key.partition(".")
    if section in FIELDS and name in FIELDS[section]:
        return section, name
    hint = difflib.get_close_matches(key, _all_keys(), n=3)
    raise ConfigError(f"{where}: unknown config key {key!r}" + (f"; did you mean {hint}?" if hint else ""))


def _coerce(value: Any, tp, where: str, choices=()) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm, where, choices)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [v for v in str(value).split(",") if v] if isinstance(value, str) else value
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]", choices) for i, v in enumerate(value)]
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r} "
                          f"({type(value).__name__})")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
    return value


def _set(cfg: Config, key: str, value: Any, where: str) -> None:
    section, name = resolve_key(key, where)
    f = FIELDS[section][name]
    value = _coerce(value, f.type, f"{where}: {section}.{name}", f.metadata.get("choices", ()))
    setattr(getattr(cfg, section), name, value)


def _apply_mapping(cfg: Config, data: dict, where: str) -> None:
    if data.get("cot") is True and data.get("coconut") is True:
        raise ConfigError(f"{where}: seed keys coconut and cot are both true; pick one")
    later = []
    for key, value in data.items():
        if key in FIELDS and isinstance(value, dict):
            for sub, v in value.items():
                _set(cfg, f"{key}.{sub}", v, where)
        elif key in FIELDS and value is None:
            continue  # empty section
        elif callable(SEED_KEYS.get(key)):
            later.append((key, value))  # after the plain keys: `cot: true` wins over `coconut: false` order
        else:
            _set(cfg, str(key), value, where)
    for key, value in later:
        for k, v in SEED_KEYS[key](value, f"{where}: {key}"):
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
    names = sorted(x.name[:-5] for x in (resources.files("mmcoconut") / "configs").iterdir()
                   if x.name.endswith(".yaml"))
    raise ConfigError(f"config {path_or_name!r}: no such file, and not a shipped config ({names})")


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
    """Defaults <- YAML file (or dict) <- command-line overrides. Raises ConfigError on any bad key/value."""
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
        if callable(SEED_KEYS.get(key)):
            _apply_mapping(cfg, {key: value}, "command line")
        else:
            _set(cfg, key, value, f"--{key}")
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config saved with to_dict() (e.g. from a checkpoint)."""
    return load_config(data=d)


def validate(cfg: Config) -> None:
    c = cfg.curriculum
    for name in ("epochs_per_stage", "stage0_epochs"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise ConfigError(f"curriculum.{name} must be >= 1, got {getattr(c, name)}")
    if c.c_thought < 0 or (c.coconut and not c.no_cot and c.max_latent_stage > 0 and c.c_thought < 1):
        raise ConfigError(f"curriculum.c_thought must be >= 1 for a coconut curriculum with latent stages "
                          f"(max_latent_stage {c.max_latent_stage}), got {c.c_thought}")
    if c.max_latent_stage < 0 or not 0.0 <= c.uniform_prob <= 1.0:
        raise ConfigError("curriculum.max_latent_stage must be >= 0 and uniform_prob in [0, 1]")
    bad_views = set(cfg.eval.views) - {"nocot", "cot", "coconut", "dummy"}
    if bad_views:
        raise ConfigError(f"eval.views: unknown {sorted(bad_views)}; choose from nocot, cot, coconut, dummy")
    for name in ("micro_batch_size", "gradient_accumulation_steps"):
        if getattr(cfg.train, name) is not None and getattr(cfg.train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1")
    if cfg.model.max_length < 8:
        raise ConfigError("model.max_length must be >= 8")
    f = cfg.data.max_skip_fraction
    if f is not None and not 0.0 <= f <= 1.0:
        raise ConfigError(f"data.max_skip_fraction must be in [0, 1] (or null for no limit), got {f}")
    if cfg.checkpoint.save_every_minutes < 0:
        raise ConfigError("checkpoint.save_every_minutes must be >= 0 (0: off)")
    for key in cfg.checkpoint.allow_config_change:
        resolve_key(key, "checkpoint.allow_config_change")
