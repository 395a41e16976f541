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
        detect: recognises a config.json without a known `model_type` (e.g. `mamba_ssm`).
        load_file: loads a single-file checkpoint (e.g. a BlinkDL `.pth`) -> (config dict,
            state dict, tokenizer or None), or None if the family has no such format.
        default_tokenizer: config dict -> a tokenizer for a checkpoint folder whose own tokenizer
            files are missing or unreadable (RWKV-7 fla-hub folders ship remote-code tokenizers).
    """

    architecture: str
    display: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any]], HookedRecurrentConfig]
    convert_state_dict: Callable[[dict[str, Tensor], HookedRecurrentConfig], dict[str, Tensor]]
    build_block: Callable[[HookedRecurrentConfig, int], nn.Module]
    build_final_norm: Callable[[HookedRecurrentConfig], nn.Module]
    build_embed_norm: Callable[[HookedRecurrentConfig], nn.Module | None] = lambda cfg: None
    detect: Callable[[dict[str, Any]], bool] | None = None
    load_file: Callable[[Path], tuple[dict[str, Any], dict[str, Tensor], Any]] | None = None
    default_tokenizer: Callable[[dict[str, Any]], Any] | None = None


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    _FAMILIES[family.architecture] = family
    return family


def _load_families() -> None:
    # importing a family module registers it
    from hooked_recurrent.pretrained import qwen3_5  # noqa: F401

    for optional in ("mamba2", "rwkv7"):
        try:
            __import__(f"hooked_recurrent.pretrained.{optional}")
        except ModuleNotFoundError as e:
            if e.name != f"hooked_recurrent.pretrained.{optional}":
                raise


def supported() -> str:
    _load_families()
    return ", ".join(
        f"{f.display} (model_type {'/'.join(f.model_types)})" for f in _FAMILIES.values()
    )


def get_family(architecture: str) -> Family:
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


def _read_state_dict(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, Tensor] = {}
        for f in files:
            sd.update(load_file(str(folder / f)))
        return sd
    single = sorted(folder.glob("*.safetensors"))
    if single:
        sd = {}
        for f in single:
            sd.update(load_file(str(f)))
        return sd
    for name in ("pytorch_model.bin", "model.pt", "model.pth"):
        if (folder / name).exists():
            return torch.load(folder / name, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors (or an index) or pytorch_model.bin"
    )


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
        raw = _read_state_dict(path)
        tokenizer = _read_tokenizer(path)
        if tokenizer is None and fam.default_tokenizer is not None:
            tokenizer = fam.default_tokenizer(config)
    cfg = fam.config_from_hf(config)
    cfg.dtype = dtype
    cfg.model_name = name_or_path
    sd = fam.convert_state_dict(raw, cfg)
    return cfg, {k: v.to(dtype) for k, v in sd.items()}, tokenizer


def convert_hf_model(hf_model: nn.Module) -> tuple[HookedRecurrentConfig, dict[str, Tensor]]:
    """(config, converted state dict) for a `transformers` model in memory."""
    config = hf_model.config.to_dict()
    fam = family_for_config(config, type(hf_model).__name__)
    cfg = fam.config_from_hf(config)
    cfg.dtype = next(hf_model.parameters()).dtype
    cfg.model_name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
    sd = fam.convert_state_dict(dict(hf_model.state_dict()), cfg)
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
