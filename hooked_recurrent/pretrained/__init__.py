"""Loading: one `Family` per architecture (config conversion, weight conversion, block builder).

A family registers itself here; `HookedRecurrentModel.from_pretrained` and `from_hf_model` find it
from the checkpoint's `config.json` (its `model_type`, or the family's own `detect`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hooked_recurrent.config import HookedRecurrentConfig

__all__ = [
    "Family",
    "register_family",
    "get_family",
    "list_pretrained",
    "load_pretrained",
    "convert_hf_model",
    "SHIPPED_DIR",
]

logger = logging.getLogger(__name__)

#: folder of the small models shipped inside the package
SHIPPED_DIR = Path(__file__).parent / "models"


#: a family's own config: a subclass of `HookedRecurrentConfig` (the callables below take it)
FamilyConfig = Any


@dataclass
class Family:
    """Everything the package knows about one architecture.

    Attributes:
        architecture: the value of `cfg.architecture`.
        display: a human name for error messages.
        model_types: Hugging Face `model_type` values this family reads.
        config_from_hf: source config dict -> our config.
        convert_state_dict: (source state dict, our config) -> our state dict.
        build_block: (config, layer) -> the block module.
        build_final_norm: config -> the final norm module.
        build_embed_norm: config -> a norm applied right after the embedding, or None.
        build_logit_transform: config -> a module applied to the logits after the unembedding
            (xLSTM's soft cap), or None.
        detect: recognises a config.json without a known `model_type` (e.g. `mamba_ssm`).
        load_file: loads a single-file checkpoint (e.g. a BlinkDL `.pth`) -> (config dict,
            state dict, tokenizer or None), or None if the family has no such format.
        default_tokenizer: config dict -> a tokenizer for a checkpoint folder whose own tokenizer
            files are missing or unreadable (RWKV-7 fla-hub folders ship remote-code tokenizers).
        ignored_prefixes: source state-dict keys the conversion may leave unused (vision towers).
        config_from_weights: (source state dict, config) -> a new config with the sizes that only
            the weights give (RWKV-7's LoRA ranks); called before `convert_state_dict`.
        checkpoints, layout, bridge: documentation for the "Supported models" page.
    """

    architecture: str
    display: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any]], HookedRecurrentConfig]
    convert_state_dict: Callable[[dict[str, Tensor], FamilyConfig], dict[str, Tensor]]
    build_block: Callable[[FamilyConfig, int], nn.Module]
    build_final_norm: Callable[[FamilyConfig], nn.Module]
    build_embed_norm: Callable[[FamilyConfig], nn.Module | None] = lambda cfg: None
    build_logit_transform: Callable[[FamilyConfig], nn.Module | None] = lambda cfg: None
    detect: Callable[[dict[str, Any]], bool] | None = None
    load_file: Callable[[Path], tuple[dict[str, Any], dict[str, Tensor], Any]] | None = None
    default_tokenizer: Callable[[dict[str, Any]], Any] | None = None
    ignored_prefixes: tuple[str, ...] = ()
    config_from_weights: Callable[[dict[str, Tensor], FamilyConfig], FamilyConfig] | None = None
    #: for the generated "Supported models" page: real checkpoints as "org/name (size)", the
    #: layer layout in one line, and what TransformerLens's TransformerBridge offers for them
    checkpoints: tuple[str, ...] = ()
    layout: str = ""
    bridge: str = ""


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Register a `Family` under its `architecture`, so that loading finds it; returns it."""
    _FAMILIES[family.architecture] = family
    return family


#: the modules that register a family when imported (add a new family's module here)
FAMILY_MODULES = (
    "qwen3_5",
    "qwen3_next",
    "olmo_hybrid",
    "minimax",
    "kimi_linear",
    "bailing_hybrid",
    "mamba2",
    "rwkv7",
    "bamba",
    "nemotron_h",
    "falcon_h1",
    "granitemoehybrid",
    "mamba1",
    "jamba",
    "zamba2",
    "xlstm",
)


def _load_families() -> None:
    for name in FAMILY_MODULES:
        __import__(f"hooked_recurrent.pretrained.{name}")


def supported() -> str:
    _load_families()
    return ", ".join(
        f"{f.display} (model_type {'/'.join(f.model_types)})" for f in _FAMILIES.values()
    )


def get_family(architecture: str) -> Family:
    """The registered `Family` of an architecture name; a ValueError lists the supported ones."""
    _load_families()
    if architecture not in _FAMILIES:
        raise ValueError(f"unknown architecture {architecture!r}; supported: {supported()}")
    return _FAMILIES[architecture]


def family_for_config(config: dict[str, Any], where: str = "") -> Family:
    _load_families()
    mt = config.get("model_type")
    for fam in _FAMILIES.values():
        if mt in fam.model_types:
            return fam
    for fam in _FAMILIES.values():
        if fam.detect is not None and fam.detect(config):
            return fam
    archs = config.get("architectures")
    raise ValueError(
        f"unsupported model{' at ' + where if where else ''}: model_type={mt!r}, "
        f"architectures={archs!r}. Supported families: {supported()}"
    )


def list_pretrained() -> list[str]:
    """Names of the small models shipped with the package, loadable offline by name."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "config.json").exists())


#: weight files read from a folder without an index, in this order (the first present is read)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _load_weights(f: Path) -> dict[str, Tensor]:
    """One weight file; a corrupt or unreadable one is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not f.is_file():
        raise FileNotFoundError(f"{f}: weight file not found")
    try:
        if f.suffix == ".safetensors":
            return load_file(str(f))
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as e:
        raise ValueError(f"{f}: cannot read the weight file, corrupt or truncated? ({e})") from e
    if not isinstance(sd, dict):
        raise ValueError(f"{f}: expected a state dict, got {type(sd).__name__}")
    return sd


def _read_state_dict(folder: Path) -> tuple[dict[str, Tensor], dict[str, Path]]:
    """(state dict, file of each tensor): exactly the files named by
    `model.safetensors.index.json`, else the first of `WEIGHT_FILES`; other weight files in the
    folder are ignored with a warning."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from e
        files = sorted(set(weight_map.values()))
    else:
        files = [n for n in WEIGHT_FILES if (folder / n).exists()][:1]
        if not files:
            raise FileNotFoundError(
                f"no weights in {folder}: expected model.safetensors (or an index) or "
                "pytorch_model.bin"
            )
    sd: dict[str, Tensor] = {}
    origin: dict[str, Path] = {}
    for name in files:
        f = folder / name
        part = _load_weights(f)
        if index.exists():
            stray = sorted(k for k in part if weight_map.get(k) != name)
            if stray:
                raise ValueError(f"{f}: tensors {stray[:5]} are not assigned to it by {index}")
        sd.update(part)
        origin.update(dict.fromkeys(part, f))
    ignored = sorted(
        p.name for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.name not in files
    )
    if ignored:
        logger.warning(
            "%s: ignoring weight files %s (reading only %s)", folder, ignored, ", ".join(files)
        )
    return sd, origin


class _Tracked(dict):
    """A state dict that records which keys a conversion read (to find unexpected tensors)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()
        self.by_id: dict[int, str] = {}

    def __getitem__(self, key: str) -> Tensor:
        t = super().__getitem__(key)
        self.read.add(key)
        self.by_id[id(t)] = key
        return t

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


def _check_converted(
    fam: Family,
    cfg: HookedRecurrentConfig,
    raw: _Tracked,
    sd: dict[str, Tensor],
    origin: dict[str, Path],
    where: Path,
) -> None:
    """Every checkpoint tensor used, and every converted tensor of the shape the config implies;
    errors name the tensor and its file."""
    import re

    from hooked_recurrent.model import HookedRecurrentModel

    def file_of(raw_key: str | None) -> str:
        return str(origin.get(raw_key, where)) if raw_key else str(where)

    unused = sorted(k for k in raw if k not in raw.read and not k.startswith(fam.ignored_prefixes))
    if unused:
        layers = sorted(
            {int(m.group(1)) for k in unused if (m := re.search(r"layers\.(\d+)\.", k))}
        )
        extra = [n for n in layers if n >= cfg.n_layers]
        why = (
            f"; the weights have layer {extra[0]} but config.json gives {cfg.n_layers} layers"
            if extra
            else ""
        )
        raise ValueError(
            f"{file_of(unused[0])}: unexpected tensor {unused[0]!r} ({len(unused)} unexpected in "
            f"all, e.g. {unused[:5]}){why}"
        )
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in HookedRecurrentModel(cfg).state_dict().items()}
    for k, t in sd.items():
        if k not in expected:
            raise ValueError(f"{where}: converted tensor {k!r} is not a parameter of the model")
        if tuple(t.shape) != expected[k]:
            src = raw.by_id.get(id(t)) or raw.by_id.get(id(getattr(t, "_base", None)))
            raise ValueError(
                f"{file_of(src)}: tensor {src or k!r} has shape {tuple(t.shape)} but config.json "
                f"implies {expected[k]} (as {k})"
            )
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"{where}: no weights for {missing[:5]}")


def _read_tokenizer(folder: Path) -> Any:
    if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # a model without a usable tokenizer still runs on token ids
        logger.warning("could not load the tokenizer in %s (%s); running without one", folder, e)
        return None


def _resolve(name_or_path: str) -> Path:
    if name_or_path in list_pretrained():
        return SHIPPED_DIR / name_or_path
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name_or_path,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.pth", "*.txt", "*.model"],
            )
        )
    raise FileNotFoundError(
        f"{name_or_path!r} is not a shipped model ({', '.join(list_pretrained()) or 'none'}), "
        "a local path, or a Hub id of the form 'owner/name'"
    )


def load_pretrained(
    name_or_path: str, dtype: torch.dtype = torch.float32
) -> tuple[HookedRecurrentConfig, dict[str, Tensor], Any]:
    """(config, converted state dict, tokenizer or None) for a name, folder, file or Hub id."""
    path = _resolve(name_or_path)
    _load_families()
    if path.is_file():
        for fam in _FAMILIES.values():
            if fam.load_file is not None:
                loaded = fam.load_file(path)
                if loaded is not None:
                    config, raw, tokenizer = loaded
                    break
        else:
            raise ValueError(f"{path}: not a checkpoint file any family reads; {supported()}")
    else:
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{path} has no config.json")
        config = json.loads(cfg_file.read_text())
        fam = family_for_config(config, str(path))
        raw, origin = _read_state_dict(path)
        tokenizer = _read_tokenizer(path)
        if tokenizer is None and fam.default_tokenizer is not None:
            tokenizer = fam.default_tokenizer(config)
    where = path if path.is_file() else path / "config.json"
    try:
        cfg = fam.config_from_hf(config)
    except KeyError as e:
        raise ValueError(
            f"{where}: the {fam.display} config lacks the field {e.args[0]!r}"
        ) from None
    cfg.dtype = dtype
    cfg.model_name = name_or_path
    if fam.config_from_weights is not None:
        cfg = fam.config_from_weights(raw, cfg)
    if path.is_file():
        sd = fam.convert_state_dict(raw, cfg)
    else:
        tracked = _Tracked(raw)
        try:
            sd = fam.convert_state_dict(tracked, cfg)
        except KeyError as e:
            files = ", ".join(sorted({str(f) for f in origin.values()})) or str(path)
            msg = e.args[0] if e.args else repr(e)
            untied = not getattr(cfg, "tie_word_embeddings", True)
            raise ValueError(
                f"{files}: {msg} (config.json gives {cfg.n_layers} layers"
                f"{', an untied output layer' if untied else ''})"
            ) from None
        _check_converted(fam, cfg, tracked, sd, origin, path)
    return cfg, {k: v.to(dtype) for k, v in sd.items()}, tokenizer


def convert_hf_model(hf_model: nn.Module) -> tuple[HookedRecurrentConfig, dict[str, Tensor]]:
    """(config, converted state dict) for a `transformers` model in memory."""
    config = getattr(hf_model, "config").to_dict()  # noqa: B009  (nn.Module types it as Tensor)
    fam = family_for_config(config, type(hf_model).__name__)
    cfg = fam.config_from_hf(config)
    cfg.dtype = next(hf_model.parameters()).dtype
    cfg.model_name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
    raw = dict(hf_model.state_dict())
    if fam.config_from_weights is not None:
        cfg = fam.config_from_weights(raw, cfg)
    sd = fam.convert_state_dict(raw, cfg)
    return cfg, sd


def sample_text(which: str = "heldout") -> str:
    """Public-domain Shakespeare shipped with the small models: `"train"` (from the training
    split) or `"heldout"` (from the held-out plays: Tempest, Sonnets, Macbeth)."""
    if which not in ("train", "heldout"):
        raise ValueError(f"which must be 'train' or 'heldout', not {which!r}")
    path = SHIPPED_DIR / f"{which}_sample.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; the shipped models are not installed")
    return path.read_text(encoding="utf-8")
