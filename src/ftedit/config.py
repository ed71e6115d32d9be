"""Edit configuration: nested dataclasses, named recipes (YAML in ``ftedit/recipes``) and overrides.

Resolution order: dataclass defaults < recipe < user config file (YAML or TOML) < ``--set key=value``.
Unknown keys are errors that name the key and the file they came from.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from ftedit.augment import AugmentConfig
from ftedit.data.text import FileReadError, read_text
from ftedit.errors import InputError
from ftedit.train import ObjectiveConfig, TrainConfig

MODES = ("mass", "single", "sequential")
DEFAULT_RECIPE = "locft-bf-rand"  # what `ftedit edit` and `ftedit demo` use without --recipe (README: default recipe)
LOCATE_RANKS = ("soft", "discrete")  # how locate ranks trials: sigmoid NLL margins, or the 0/1 rates


@dataclass
class ParamConfig:
    layers: str = "-3:"  # "15", "15,16" or a list, "-3:" (last three), "4:8", "all", "frac:0.66"; quote slices in YAML
    # "auto": choose layer and module group by a short trial sweep (see LocateConfig); replaces layers and modules
    modules: str = "down"  # roles up/gate/down/q/k/v/o/qkv, groups mlp/attn, or block; comma-separated
    method: str = "full"  # "full": update the selected weights; "lora": train LoRA adapters on them (see LoraConfig)
    norm_constraint: float = 0.0  # >0: FT-L, clamp each weight within this distance of its original value


@dataclass
class LoraConfig:
    """LoRA adapters (peft) for ``params.method=lora``, and the settings a LoRA edit needs instead of the recipe's.

    A LoRA update of scale ``alpha / r`` from a zero start moves far less per step than the full weight, so a
    full-weight learning rate barely edits. With ``params.method=lora``, ``lr``, ``epochs`` and ``modules`` take
    the place of ``train.lr``, ``train.epochs`` and ``params.modules`` (0 or "" keeps the recipe's value); a
    value set explicitly for those fields in a config file or with ``--set`` still wins. Defaults chosen on
    held-out COUNTERFACT edits (``benchmarks/lora_dev.py``, README "LoRA").
    """

    r: int = 4  # adapter rank
    alpha: int = 8  # scale alpha / r
    dropout: float = 0.0
    lr: float = 1e-2  # replaces train.lr when params.method=lora (0: keep train.lr); 20x the recipes' full-weight lr
    epochs: int = 0  # replaces train.epochs when params.method=lora (0: keep train.epochs)
    modules: str = ""  # replaces params.modules when params.method=lora ("": the recipe's modules)

    def overlay(self) -> dict[str, Any]:
        """The train/params fields this section replaces, as a config mapping."""
        train = {k: v for k, v in (("lr", self.lr), ("epochs", self.epochs)) if v}
        params = {"modules": self.modules} if self.modules else {}
        return {k: v for k, v in (("train", train), ("params", params)) if v}


@dataclass
class LocateConfig:
    """Where-to-edit search: trial edits at each (layer, module group), ranked by edit score.

    Used by ``ftedit locate`` and by ``params.layers=auto``. Trials use the edit's own recipe without
    augmentation; ``auto`` runs them on a sample of the shipped calibration set (COUNTERFACT train split), never
    on the edits. The model is restored after each trial.
    """

    layers: str = "all"  # candidate layers (params.layers syntax)
    layer_stride: int = 1  # keep every k-th candidate layer, counting back from the last one
    modules: str = "down,up,gate,attn,block"  # candidate module groups; ones a model lacks are skipped
    n_edits: int = 50  # edits sampled for the trials (with 20, sampling noise decided SmolLM2's ranking)
    strategy: str = "halving"  # "halving": successive halving (cheap); "exhaustive": every candidate, full budget
    rank: str = "soft"  # "soft": edit score of sigmoid(NLL margins), smooth on short trials; "discrete": 0/1 rates
    eta: int = 3  # halving keeps the best 1/eta candidates after each rung
    rungs: int = 3  # halving rungs; budgets grow by eta per rung up to the recipe's epochs
    seed: int = 0  # which edits are sampled
    cache: bool = True  # reuse a finished search for the same model and settings (cache_dir()/locate)


@dataclass
class EditConfig:
    recipe: str = "custom"
    description: str = ""
    mode: str = "mass"  # "mass": all edits at once; "single": each edit on a fresh model; "sequential": batches
    sequential_batch: int = 100  # edits per batch in sequential mode
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    params: ParamConfig = field(default_factory=ParamConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    locate: LocateConfig = field(default_factory=LocateConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {MODES}")
        if self.params.method not in ("full", "lora"):
            raise ConfigError(f"params.method {self.params.method!r} is not 'full' or 'lora'")
        if self.lora.r < 1 or self.lora.alpha <= 0 or self.lora.lr < 0 or self.lora.epochs < 0:
            raise ConfigError("lora: r must be >= 1, alpha > 0, lr and epochs >= 0")
        if self.train.pipeline not in ("breadth", "depth"):
            raise ConfigError(f"train.pipeline {self.train.pipeline!r} is not 'breadth' or 'depth'")
        if self.locate.strategy not in ("halving", "exhaustive"):
            raise ConfigError(f"locate.strategy {self.locate.strategy!r} is not 'halving' or 'exhaustive'")
        if self.locate.rank not in LOCATE_RANKS:
            raise ConfigError(f"locate.rank {self.locate.rank!r} is not one of {LOCATE_RANKS}")
        if self.locate.eta < 2 or self.locate.rungs < 1 or self.locate.n_edits < 1 or self.locate.layer_stride < 1:
            raise ConfigError("locate: eta must be >= 2; rungs, n_edits and layer_stride >= 1")
        for name in ("epochs", "batch_size", "grad_accum", "steps_per_edit", "checkpoint_every"):
            if getattr(self.train, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self.train, name)}")
        if self.objective.locality_loss not in ("ce", "kl"):
            raise ConfigError(f"objective.locality_loss {self.objective.locality_loss!r} is not 'ce' or 'kl'")
        if self.objective.locality_loss == "kl" and self.objective.dpo_weight > 0:
            raise ConfigError("objective.locality_loss=kl does not combine with objective.dpo_weight > 0")
        if self.objective.locality_top_k < 1:
            raise ConfigError("objective.locality_top_k must be at least 1")
        if self.train.threshold_check not in ("after", "before"):
            raise ConfigError(f"train.threshold_check {self.train.threshold_check!r} is not 'after' or 'before'")
        if self.train.pipeline == "depth" and self.train.stop_margin > 0:
            raise ConfigError("train.stop_margin applies to breadth-first training only (train.pipeline=breadth)")
        if self.train.pipeline == "breadth" and self.train.fresh_optimizer_per_edit:
            raise ConfigError("train.fresh_optimizer_per_edit applies to depth-first training (train.pipeline=depth)")
        if self.sequential_batch < 1:
            raise ConfigError("sequential_batch must be at least 1")
        _check_numbers(self)
        _check_locations(self)
        try:
            self.augment.validate()
        except ValueError as e:
            raise ConfigError(f"augment: {e}") from None


#: Numeric fields that must be finite, with (lowest allowed, whether the lowest itself is allowed).
_BOUNDS = {
    "train.lr": (0.0, False), "train.weight_decay": (0.0, True), "train.warmup_ratio": (0.0, True),
    "train.max_grad_norm": (0.0, True), "train.stop_margin": (0.0, True), "train.loss_threshold": (0.0, True), "lora.alpha": (0.0, False),
    "lora.dropout": (0.0, True), "lora.lr": (0.0, True), "params.norm_constraint": (0.0, True), "objective.dpo_weight": (0.0, True),
    "objective.dpo_beta": (0.0, False),
}
_OPTIMIZERS = ("adamw", "adam", "sgd")
_PRECISIONS = ("auto", "bf16", "no")


def _check_locations(cfg: EditConfig) -> None:
    from ftedit.params import SelectionError, check_layer_syntax, expand_modules

    try:
        if cfg.params.layers != "auto":
            check_layer_syntax(cfg.params.layers)
        check_layer_syntax(cfg.locate.layers, "locate.layers")
        expand_modules(cfg.params.modules)
        expand_modules(cfg.locate.modules)
    except SelectionError as e:
        raise ConfigError(str(e)) from None


def _check_numbers(cfg: EditConfig) -> None:
    for name, (low, inclusive) in _BOUNDS.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    if not cfg.train.warmup_ratio < 1 or not cfg.lora.dropout < 1:
        raise ConfigError("train.warmup_ratio and lora.dropout must be below 1")
    if cfg.train.optimizer not in _OPTIMIZERS:
        raise ConfigError(f"train.optimizer {cfg.train.optimizer!r} is not one of {_OPTIMIZERS}")
    if cfg.train.mixed_precision not in _PRECISIONS:
        raise ConfigError(f"train.mixed_precision {cfg.train.mixed_precision!r} is not one of {_PRECISIONS}")


class ConfigError(InputError):
    """A recipe, config file or --set value that cannot be used (names the source and the field)."""


def recipe_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in files("ftedit.recipes").iterdir() if p.name.endswith(".yaml"))


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = read_text(path, "config file")
    except FileReadError as e:
        raise ConfigError(str(e), hint=e.hint) from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
    return data


def _merge(obj: Any, updates: dict[str, Any], where: str, prefix: str = "") -> None:
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown config field {prefix + key!r}; known: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {prefix + key!r} must be a mapping")
            _merge(current, value, where, prefix + key + ".")
        else:
            setattr(obj, key, _coerce(value, current, f"{where}: {prefix + key}"))


def _coerce(value: Any, current: Any, where: str) -> Any:
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{where}: expected a boolean, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    try:
        if isinstance(current, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(current, float):
            return float(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: expected a {type(current).__name__}, got {value!r}") from e
    if isinstance(current, str):
        if isinstance(value, list | tuple):  # params.layers: [15, 16] in a YAML/TOML file
            return ",".join(str(v) for v in value)
        return str(value)
    if isinstance(value, str) and (current is None or isinstance(current, tuple | list)):
        value = yaml.safe_load(value)  # "--set augment.paraphrase_bank=16" or "...prefix_seeds=[The, A]"
    return tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "mode=single"]`` -> nested dict of raw strings, typed later by the field they set."""
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-4")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = raw.strip()
    return out


def resolve_config(recipe: str | None = None, config_file: str | Path | None = None,
                   overrides: list[str] | dict[str, Any] | None = None) -> EditConfig:
    """Defaults < recipe < (LoRA edits: the ``lora`` section's lr/epochs/modules) < ``config_file`` < ``overrides``."""
    cfg = _resolve(recipe, config_file, overrides)
    if cfg.params.method == "lora" and cfg.lora.overlay():
        cfg = _resolve(recipe, config_file, overrides, cfg.lora.overlay())
    cfg.validate()
    return cfg


def _resolve(recipe: str | None, config_file, overrides, lora_overlay: dict[str, Any] | None = None) -> EditConfig:
    cfg = EditConfig()
    if recipe:
        if recipe not in recipe_names():
            raise ConfigError(f"unknown recipe {recipe!r}; available: {', '.join(recipe_names())}")
        path = Path(str(files("ftedit.recipes").joinpath(recipe + ".yaml")))
        _merge(cfg, _read_mapping(path), f"recipe {recipe}")
        cfg.recipe = recipe
    if lora_overlay:
        _merge(cfg, lora_overlay, f"lora section of recipe {recipe}" if recipe else "lora section")
    return merge_sources(cfg, config_file, overrides)


def merge_sources(obj: Any, config_file: str | Path | None = None,
                  overrides: list[str] | dict[str, Any] | None = None) -> Any:
    """Update the dataclass ``obj`` from a YAML/TOML file, then from ``overrides`` ("key=value" or a dict)."""
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path}: {'is a directory' if path.is_dir() else 'no such file'}")
        _merge(obj, _read_mapping(path), str(path))
    if overrides:
        _merge(obj, parse_assignments(overrides) if isinstance(overrides, list) else overrides, "--set")
    return obj

