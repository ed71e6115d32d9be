"""The registry of editing methods: every recipe and baseline, registered once with its config class, its apply
function and what it can do (in the manner of peft's ``PEFT_TYPE_TO_CONFIG_MAPPING``).

A method's apply function has the signature ``apply(model, tok, requests, config, context) -> AppliedEdit``.
Config classes and apply functions are named by ``"module:attribute"`` and imported on first use, so listing
the methods imports none of them (the baselines pull in statistics code nobody else needs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ftedit.config import EditConfig, merge_sources, recipe_names, resolve_config
from ftedit.data.examples import PoolFact
from ftedit.errors import InputError

if TYPE_CHECKING:
    from ftedit.checkpoint import Checkpoints
    from ftedit.train import TrainResult


@dataclass(frozen=True)
class Capabilities:
    """What a method supports; the pipeline turns an unsupported request into an error naming the method."""

    resume: bool = False  # resumable training checkpoints (--resume)
    adapter: bool = False  # LoRA adapters (params.method=lora, --save adapter)
    quantize: bool = False  # trains on 4/8-bit base weights (--quantize)
    pool: bool = False  # draws augmentation facts from a pool (--pool)
    locate: bool = False  # params.layers=auto
    sharded: bool = False  # trains under FSDP sharding
    modes: tuple[str, ...] = ("mass",)  # mass | single | sequential
    saves: tuple[str, ...] = ("model", "none")  # --save modes, the default first (model | adapter | codebook | none)
    in_context: bool = False  # the edit is a per-record prompt prefix: scored one record at a time, saves nothing


RECIPE_CAPABILITIES = Capabilities(resume=True, adapter=True, quantize=True, pool=True, locate=True, sharded=True,
                                   modes=("mass", "single", "sequential"), saves=("model", "adapter", "none"))
CLOSED_FORM = Capabilities()
#: GRACE: sequential by construction; the codebook sits beside the weights and cannot be merged into them.
CODEBOOK = Capabilities(saves=("codebook", "none"))
#: IKE: single editing by nature (each record is scored with only its own fact in context); nothing to save.
IN_CONTEXT = Capabilities(pool=True, saves=("none",), in_context=True)


@dataclass(frozen=True)
class TouchedModule:
    """A module whose weights an edit changed."""

    name: str
    layer: int
    role: str  # "down", "up", "attn_out", "block", ...

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layer": self.layer, "role": self.role}


@dataclass
class ApplyContext:
    """What every apply function receives besides the model, tokenizer, requests and config."""

    pool: Sequence[PoolFact] | None = None
    progress: bool = True
    model_fingerprint: str = ""
    checkpoints: Checkpoints | None = None  # for methods with Capabilities.resume
    identity: Any = None  # the model's ModelIdentity: finds the shipped location of a bundled model
    pool_source: str | None = None  # the --pool file (or "shipped") itself, for methods that read whole records


@dataclass
class AppliedEdit:
    """An edit applied in place to ``model``: what it touched, how it trained, and how to undo it."""

    method: str  # the registered name (recipe or baseline)
    model: nn.Module  # the model to evaluate (a PeftModel for LoRA edits)
    config: dict[str, Any]  # the resolved recipe config or baseline hyperparameters
    touched: list[TouchedModule]
    weights: str  # "full" (weights changed in place) or "lora" (adapters)
    seconds: float  # wall time of the edit
    restore_weights: Callable[[], nn.Module]
    merge: Callable[[], nn.Module] | None = None  # folds LoRA adapters into the weights
    save_state: Callable[[Path], Path] | None = None  # writes an edit kept beside the weights (GRACE's codebook)
    seed: int = 0
    trainable_parameters: int = 0
    train: list[TrainResult] = field(default_factory=list)  # one per training run; empty for closed forms
    phase_seconds: dict[str, float] = field(default_factory=dict)  # locate, augment, train, edit
    examples_by_kind: dict[str, int] = field(default_factory=dict)
    location: dict[str, Any] | None = None  # how params.layers=auto chose the location
    single_edit_metrics: list[dict[str, Any]] = field(default_factory=list)  # single mode: each edit's metrics
    log: dict[str, Any] = field(default_factory=dict)  # closed forms: per-request solve records
    _merged: bool = field(default=False, repr=False)

    def restore(self) -> nn.Module:
        """Undo the edit and return the original model."""
        if self._merged:
            raise RuntimeError("the LoRA edit was merged into the weights (merged_model()); it cannot be undone")
        return self.restore_weights()

    def merged_model(self) -> nn.Module:
        """A plain transformers model with the edit folded in. Merging LoRA adapters is final: no restore()."""
        if self.merge is not None and not self._merged:
            self.model = self.merge()
            self._merged = True
        return self.model

    def touched_dicts(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.touched]

    @property
    def layers(self) -> list[int]:
        return sorted({t.layer for t in self.touched})


def _load(ref: str):
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method. ``config_class`` and ``apply`` are ``"module:attribute"`` references."""

    name: str
    config_ref: str
    apply_ref: str
    capabilities: Capabilities
    seed_field: str  # the config field holding the seed, for --seed
    recipe: bool = False  # a fine-tuning recipe (config from recipes/<name>.yaml)

    @property
    def config_class(self) -> type:
        return _load(self.config_ref)

    @property
    def apply(self) -> Callable[..., AppliedEdit]:
        return _load(self.apply_ref)

    def resolve_config(self, config_file: str | Path | None = None,
                       overrides: list[str] | dict[str, Any] | None = None):
        """Defaults < recipe < ``config_file`` < ``overrides``."""
        if self.recipe:
            return resolve_config(self.name, config_file, overrides)
        return merge_sources(self.config_class(), config_file, overrides)

    def seed_override(self, seed: int) -> str:
        return f"{self.seed_field}={seed}"

    def seed_of(self, config) -> int:
        value = config
        for part in self.seed_field.split("."):
            value = getattr(value, part)
        return int(value)


_BASELINES: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _BASELINES or spec.name in recipe_names():
        raise ValueError(f"method {spec.name!r} is already registered")
    _BASELINES[spec.name] = spec
    return spec


def _closed_form(name: str, module: str, config_class: str) -> MethodSpec:
    return register(MethodSpec(name, f"ftedit.baselines.{module}:{config_class}",
                               f"ftedit.baselines.{module}:apply_{module}", CLOSED_FORM, seed_field="seed"))


_closed_form("rome", "rome", "ROMEHyperParams")
_closed_form("memit", "memit", "MEMITHyperParams")
_closed_form("alphaedit", "alphaedit", "AlphaEditHyperParams")
_closed_form("mend", "mend", "MENDHyperParams")  # hypernetworks: a trained editor applies in closed form
_closed_form("malmen", "malmen", "MALMENHyperParams")
register(MethodSpec("grace", "ftedit.baselines.grace:GRACEHyperParams", "ftedit.baselines.grace:apply_grace",
                    CODEBOOK, seed_field="seed"))
register(MethodSpec("ike", "ftedit.baselines.ike:IKEHyperParams", "ftedit.baselines.ike:apply_ike",
                    IN_CONTEXT, seed_field="seed"))


def _recipe_spec(name: str) -> MethodSpec:
    return MethodSpec(name, f"{EditConfig.__module__}:{EditConfig.__name__}", "ftedit.editor:apply_recipe",
                      RECIPE_CAPABILITIES, seed_field="train.seed", recipe=True)


def method_names() -> list[str]:
    """Every registered method: the recipes (``recipes/*.yaml``), then the closed-form baselines."""
    return recipe_names() + sorted(_BASELINES)


def get_method(name: str) -> MethodSpec:
    if name in _BASELINES:
        return _BASELINES[name]
    if name in recipe_names():
        return _recipe_spec(name)
    raise InputError(f"unknown method {name!r}; available: {', '.join(method_names())}")
