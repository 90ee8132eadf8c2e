"""PEFT helpers: load a pulled global adapter into a ``PeftModel`` and push from one, and
write an exported round as a PEFT adapter directory for serving.

PEFT is an optional extra (``pip install raflora[peft]``); nothing else in the SDK needs it,
and the export helpers need no PEFT at all (they write PEFT's file format). Names, ranks and
scalings are checked so that a mismatch fails loudly instead of training a silently rescaled
adapter.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from raflora.v1.wire import LORA_A, LORA_B, split_tensor_name, tensor_name

from .client import PulledAdapter


class AdapterMismatchError(ValueError):
    """The pulled adapter does not fit the local model; ``field`` names what differs."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _lora_layers(model: nn.Module, adapter: str) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }
    if not layers:
        raise AdapterMismatchError("model", f"no LoRA layers with adapter {adapter!r}")
    return layers


def adapter_shapes(model: nn.Module, adapter: str = "default") -> dict[str, tuple[int, int]]:
    """``{module: (d_out, d_in)}`` in PEFT's state-dict naming, for a federation's schema."""
    shapes = {}
    for name, layer in _lora_layers(model, adapter).items():
        weight = layer.get_base_layer().weight
        shapes[name] = (int(weight.shape[0]), int(weight.shape[1]))
    return shapes


def adapter_rank_and_scale(model: nn.Module, adapter: str = "default") -> tuple[int, float, float]:
    """(rank, lora_alpha, scaling) shared by every LoRA layer; raises if they differ."""
    seen = {
        (int(layer.r[adapter]), float(layer.lora_alpha[adapter]), float(layer.scaling[adapter]))
        for layer in _lora_layers(model, adapter).values()
    }
    if len(seen) != 1:
        raise AdapterMismatchError(
            "rank", f"LoRA layers disagree on (rank, alpha, scaling): {sorted(seen)}"
        )
    return seen.pop()


@torch.no_grad()
def load_pulled_adapter(model: nn.Module, pulled: PulledAdapter, adapter: str = "default") -> None:
    """Copy the pulled factors into the model's LoRA weights (after FLoRA's merge, if any)."""
    layers = _lora_layers(model, adapter)
    expected = {tensor_name(m, f) for m in layers for f in (LORA_A, LORA_B)}
    got = set(pulled.tensors)
    if missing := sorted(expected - got):
        raise AdapterMismatchError(missing[0], "the pulled adapter lacks this tensor")
    if unknown := sorted(got - expected):
        raise AdapterMismatchError(unknown[0], "the model has no LoRA layer for this tensor")
    rank, alpha, scale = adapter_rank_and_scale(model, adapter)
    if rank != pulled.rank:
        raise AdapterMismatchError(
            "rank", f"the model's LoRA rank is {rank} but the adapter was served at {pulled.rank}"
        )
    if not math.isclose(scale, pulled.scale, rel_tol=1e-6):
        raise AdapterMismatchError(
            "scale",
            f"the model scales LoRA by {scale:g} (alpha {alpha:g}, rank {rank}) but the server "
            f"assumed {pulled.scale:g}; join with the model's lora_alpha",
        )
    for name, layer in layers.items():
        if pulled.merge is not None:
            B = pulled.merge[tensor_name(name, LORA_B, merge=True)]
            A = pulled.merge[tensor_name(name, LORA_A, merge=True)]
            base = layer.get_base_layer().weight
            base += (B.to(torch.float32) @ A.to(torch.float32)).to(base.dtype)
        for factor, module in ((LORA_A, layer.lora_A[adapter]), (LORA_B, layer.lora_B[adapter])):
            source = pulled.tensors[tensor_name(name, factor)]
            if tuple(source.shape) != tuple(module.weight.shape):
                raise AdapterMismatchError(
                    tensor_name(name, factor),
                    f"shape {tuple(source.shape)} != model's {tuple(module.weight.shape)}",
                )
            module.weight.copy_(source.to(module.weight.dtype))


def adapter_state(model: nn.Module, adapter: str = "default") -> dict[str, Tensor]:
    """The model's LoRA factors under the wire's PEFT names, detached on the CPU."""
    out: dict[str, Tensor] = {}
    for name, layer in _lora_layers(model, adapter).items():
        out[tensor_name(name, LORA_A)] = layer.lora_A[adapter].weight.detach().cpu().clone()
        out[tensor_name(name, LORA_B)] = layer.lora_B[adapter].weight.detach().cpu().clone()
    return out


# -- export: a published round as a PEFT adapter directory ------------------------------------
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before a module's path in the base model
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def peft_module_name(module: str) -> str:
    """A federation module's name in PEFT's saved state dict (``base_model.model.<path>``).

    Federations built from a ``PeftModel`` (:func:`adapter_shapes`) already use that name; a
    bare module path (``layers.0.self_attn.q_proj``) gets the prefix."""
    return module if module.startswith(PEFT_PREFIX) else PEFT_PREFIX + module


def peft_target_module(module: str) -> str:
    """The module's path in the base model: what ``target_modules`` names."""
    return module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module


def peft_state_dict(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Wire tensors (``<module>.lora_{A,B}.weight``) under PEFT's saved names
    (``base_model.model.<path>.lora_{A,B}.weight``, no adapter name), contiguous fp32."""
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        module, factor, merge = split_tensor_name(name)
        if merge:
            raise AdapterMismatchError(name, "a merge delta cannot be part of a PEFT adapter")
        out[tensor_name(peft_module_name(module), factor)] = tensor.float().contiguous()
    return out


def peft_adapter_config(
    modules: Sequence[str],
    rank: int,
    lora_alpha: float,
    *,
    use_rslora: bool = False,
    base_model: str | None = None,
) -> dict[str, Any]:
    """``adapter_config.json`` of a plain LoRA adapter on exactly ``modules`` (full paths, so
    that PEFT adapts those modules and no others of the same name)."""
    alpha: float | int = int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "target_modules": sorted({peft_target_module(m) for m in modules}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }


def check_export_target(out_dir: Path) -> None:
    """An export goes to a new path or an empty directory: never over anything."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory")


def write_peft_adapter(
    out_dir: Path,
    state: Mapping[str, Tensor],
    config: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into a temporary
    directory beside ``out_dir`` (fsynced), then rename it to ``out_dir``: a reader never sees
    half an adapter. ``out_dir`` must not exist or be an empty directory."""
    check_export_target(out_dir)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
    try:
        save_file(dict(state), str(tmp / ADAPTER_WEIGHTS_NAME), metadata=dict(metadata or {}))
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
            with (tmp / name).open("rb") as f:
                os.fsync(f.fileno())
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the adapter from a serving user
        check_export_target(out_dir)
        os.replace(tmp, out_dir)  # an empty out_dir is replaced; a non-empty one refuses
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return out_dir


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: no directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
