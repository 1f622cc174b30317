"""Adapter publishing: versioned LoRA tensors from the learner to the generators.

Only the adapter travels (for Llama-2-7B, r=16 on q/k/v/o: 16.8 M parameters, 33.6 MB in
bf16), through the Ray object store. A generator writes each version to its own directory
on a RAM disk and serves it under a new LoRA id, because vLLM caches adapters by id and a
reused id keeps serving the old weights.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class AdapterVersion:
    """A published adapter: LoRA tensors (PEFT's saved names) plus its PEFT config."""

    version: int
    tensors: dict[str, torch.Tensor]
    peft_config: dict[str, Any]
    # learner.method ssf | repadapter | full: ``tensors`` are the method's own (what checkpoints
    # keep, PEFT-like), ``merged`` the weights the generators load (the layers it changed).
    merged: Optional[dict[str, torch.Tensor]] = None

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.merged or self.tensors).values())


def extract_adapter(peft_model, version: int) -> AdapterVersion:
    """The adapter's tensors under the names PEFT's ``save_pretrained`` writes
    (``...q_proj.lora_A.weight``, adapter name stripped), detached onto the CPU."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    cfg = peft_model.peft_config["default"].to_dict()
    # PEFT keeps target_modules as a set; JSON (and vLLM's reader) want a list.
    cfg = json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    return AdapterVersion(version=version, tensors=tensors, peft_config=cfg)


def extract_method(model, version: int, dtype: Optional[torch.dtype] = None) -> AdapterVersion:
    """A version of a policy trained with SSF, RepAdapter or full fine-tuning: its own tensors
    (all weights for full) and the merged weights the generators load, in ``dtype``."""
    from .models.methods import merged_tensors, method_of, method_state

    spec = method_of(model)
    merged = merged_tensors(model, dtype)
    if spec is None:  # full: the merged weights are the policy's own
        return AdapterVersion(version, merged, {"rlhf_ray_method": "full"}, merged=merged)
    return AdapterVersion(version, method_state(model), {"rlhf_ray_method": spec.method, **spec.to_json()},
                          merged=merged)


def adapter_root(need_bytes: int = 0) -> tuple[Path, str]:
    """(directory, note): a RAM disk where there is one with room for ``need_bytes`` (writes
    and vLLM's reads cost microseconds), else the temp directory, with a note saying why.
    Docker gives containers a 64 MB /dev/shm by default, less than a 7B model's r=64 adapter."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        free = shutil.disk_usage(shm).free
        if free >= need_bytes:
            return shm / "rlhf_ray_adapters", ""
        note = (f"/dev/shm has {free / 2**20:.0f} MiB free, less than the {need_bytes / 2**20:.0f} MiB "
                f"adapters need; writing them under {tempfile.gettempdir()} instead")
    else:
        note = f"no writable /dev/shm; adapters go under {tempfile.gettempdir()}"
    return Path(tempfile.gettempdir()) / "rlhf_ray_adapters", note


def write_adapter(adapter: AdapterVersion, directory: Path) -> Path:
    """Write ``adapter`` as a PEFT adapter directory (safetensors + adapter_config.json)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter.tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(adapter.peft_config))
    return directory


def remove_adapter_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


VALUE_HEAD_FILE = "value_head.safetensors"


def save_policy(adapter: AdapterVersion, value_head: dict[str, torch.Tensor], directory: Path) -> Path:
    """The trained policy as a PEFT adapter directory (``PeftModel.from_pretrained`` and a vLLM
    ``LoRARequest`` both load it) plus the value head, replacing ``directory`` atomically: it is
    written beside it and renamed over it, so a crash leaves the old or the new one whole."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_adapter(adapter, tmp)
    if value_head:
        save_file(value_head, str(tmp / VALUE_HEAD_FILE))
    (tmp / "rlhf_ray_adapter.json").write_text(json.dumps({"version": adapter.version}))
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory
