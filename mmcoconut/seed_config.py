"""The seed project's flat config keys, accepted as they are.

"Seed project" = the code mmcoconut started from: facebookresearch/coconut's `args/*.yaml` (name, model_id, coconut,
c_thought, ...) and the multimodal seed trainer's flat configs (clip_id, batch_size_eval, load_model_path). Each
key maps onto a dotted mmcoconut key (a string in SEED_KEYS) or is translated by a function (value -> [(dotted key,
value), ...]) that raises SeedValueError for a value mmcoconut cannot honour (config.py turns it into a
ConfigError naming the file). docs/seed-compatibility.md has the table (generated from SEED_KEYS and SEED_KEY_DOCS).
"""
from __future__ import annotations

from typing import Callable, Optional, Union


class SeedValueError(ValueError):
    """A seed key's value that mmcoconut cannot honour."""

Translation = Callable[[object, str], list]


def _false_only(key: str, hint: str) -> Translation:
    def apply(value, where):
        if value in (False, None, "None", 0):
            return []
        raise SeedValueError(f"{where}: seed key {key}: {value!r} is not supported by mmcoconut ({hint})")
    return apply


def _load_model_path(value, where):
    return [] if value in (None, "None", "none", "") else [("model.init_from", value)]


def _cot(value, where):
    return [("curriculum.coconut", False)] if value is True else []


def _bf16(value, where):
    return [("train.precision", "bf16" if value is True else "fp32")]


SEED_KEYS: dict[str, Union[str, Translation]] = {
    "name": "train.name", "model_id": "model.lm_id", "clip_id": "model.vision_id", "project": "logging.project",
    "seed": "train.seed", "train_path": "data.train_shards", "val_path": "data.val_shards",
    "save_path": "checkpoint.save_dir", "coconut": "curriculum.coconut", "no_cot": "curriculum.no_cot",
    "num_epochs": "train.num_epochs", "epochs_per_stage": "curriculum.epochs_per_stage",
    "c_thought": "curriculum.c_thought", "max_latent_stage": "curriculum.max_latent_stage",
    "pad_latent_to_max": "curriculum.pad_latent_to_max", "uniform_prob": "curriculum.uniform_prob",
    "reset_optimizer": "curriculum.reset_optimizer", "batch_size_training": "train.micro_batch_size",
    "batch_size_eval": "eval.batch_size", "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "lr": "train.lr", "weight_decay": "train.weight_decay", "resume": "checkpoint.resume",
    "load_model_path": _load_model_path,
    "bf16": _bf16,
    "cot": _cot,
    "only_eval": _false_only("only_eval", "evaluate with: mmcoconut-eval CKPT SHARDS"),
    "save_only_improve": _false_only("save_only_improve", "the newest checkpoint.keep_last checkpoints are "
                                     "kept; pick one by validation accuracy in metrics.jsonl"),
    "no_thoughts": _false_only("no_thoughts", "Coconut's w/o-thought ablation is not implemented"),
    "debug": _false_only("debug", "for a short run use --logging.report_to=none --train.max_steps_per_epoch=N "
                         "--eval.val_samples=32"),
}
SEED_KEY_DOCS = {
    "load_model_path": "model.init_from (\"None\": none)", "bf16": "train.precision = bf16 (true) | fp32 (false)",
    "cot": "true: curriculum.coconut = false (plain CoT training)",
    "only_eval": "false only (true: use mmcoconut-eval)", "save_only_improve": "false only",
    "no_thoughts": "false only", "debug": "false only",
}


def seed_target(key: str) -> Optional[str]:
    """The dotted key a plain seed key stands for (None: not a plain seed key)."""
    target = SEED_KEYS.get(key)
    return target if isinstance(target, str) else None


def is_translated(key: str) -> bool:
    """A seed key whose value is translated by a function (applied after the plain keys)."""
    return callable(SEED_KEYS.get(key))


def translate(key: str, value, where: str) -> list:
    return SEED_KEYS[key](value, where)


def describe(key: str) -> str:
    """What a seed key becomes, for --help and the docs table."""
    target = SEED_KEYS[key]
    return target if isinstance(target, str) else SEED_KEY_DOCS.get(key, "")


def seed_form_keys(data: dict, field_names) -> list[str]:
    """The keys of `data` that only the seed has (not an mmcoconut field name): `data` is a seed config."""
    return [k for k in data if k in SEED_KEYS and k not in field_names]


def seed_defaults(data: dict, field_names, where: str) -> tuple[list, list[str]]:
    """What a seed config means by the keys it leaves out: ([(dotted key, value)], [note]). A seed config with
    neither `coconut` nor `cot` (the seed's cot.yaml, which its CoT script runs) trains CoT only: stage 0, no latents
    (upstream run.py: stage 0 and no markers for `cot`), not mmcoconut's default Coconut curriculum."""
    sectioned = data.get("curriculum") if isinstance(data.get("curriculum"), dict) else {}
    if not seed_form_keys(data, field_names) or {"coconut", "cot"} & (set(data) | set(sectioned)):
        return [], []
    return [("curriculum.coconut", False)], [
        f"{where}: a seed config without coconut/cot keys is the seed's CoT-only mode: curriculum.coconut=false "
        "(stage 0 only, no latents); add coconut: true for the Coconut curriculum"]


def batch_note(ds: dict, world: int, ds_file: str, explicit: bool) -> str:
    """How the global batch of a seed config (batch_size_training) was derived, for the log."""
    micro, acc, glob = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]
    how = f"batch_size_training {micro} x {world} rank(s) x gradient_accumulation_steps {acc}"
    if explicit:
        return (f"batch: global batch {glob} = {how}, from the ds_config {ds_file} given (its train_batch_size is "
                "kept unless the seed config sets gradient_accumulation_steps); without --deepspeed it would be "
                f"the seed's {micro * world} = batch_size_training {micro} x {world} rank(s)")
    return f"batch: global batch {glob} = {how} (the seed's batch; the ds_config {ds_file} gives ZeRO and precision)"


def check_seed_values(data: dict, where: str) -> None:
    """Seed values that contradict each other."""
    if data.get("cot") is True and data.get("coconut") is True:
        raise SeedValueError(f"{where}: seed keys coconut and cot are both true; pick one")
