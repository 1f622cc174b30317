"""Parameter-efficient methods as one choice: ``full | lora | dora | ia3 | ssf | repadapter``.

LoRA, DoRA and IA3 come from PEFT. SSF and RepAdapter, the other two methods of the paper this
project follows (Xu et al.: LoRA, SSF and RepAdapter on Llama-2-7B), are small modules written
here; each wraps a ``torch.nn.Linear`` and folds exactly into it (``merge_method``), so what a
stage saves is a plain model any later stage, and vLLM, loads:

- SSF (scaling and shifting features) scales and shifts a layer's output per channel:
  ``y = gamma * (W x + b) + beta``; merged, ``W' = diag(gamma) W`` and ``b' = gamma * b + beta``.
  The shift needs a bias: a bias-free layer gets one (for Llama-family models through
  ``config.attention_bias`` / ``config.mlp_bias``, which give every layer of that group a bias).
- RepAdapter adds a linear adapter without a non-linearity in front of a layer:
  ``y = W (x + s * U D x) + b``, with ``D`` a dense down-projection to ``rank`` and ``U`` a
  group-wise (block-diagonal) up-projection; merged, ``W' = W (I + s U D)`` and the bias is
  unchanged, so the architecture is too (zero cost at inference). No biases in the adapter, so a
  bias-free base stays bias-free.

The unmerged method is saved PEFT-like (``adapter_config.json`` + ``adapter_model.safetensors``)
for reuse; ``load_method`` puts it back on a base.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

METHODS = ("full", "lora", "dora", "ia3", "ssf", "repadapter")
PEFT_METHODS = ("lora", "dora", "ia3")
OWN_METHODS = ("ssf", "repadapter")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Which config flag gives which Linear layers a bias (Llama-family models): SSF's shift needs one.
BIAS_FLAGS = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
              "mlp_bias": ("gate_proj", "up_proj", "down_proj")}


@dataclass(frozen=True)
class MethodSpec:
    """What a stage needs to apply a method: its name, the Linear layers (by last name) it
    targets, and its own settings."""

    method: str
    targets: tuple[str, ...]
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    repadapter_rank: int = 8
    repadapter_groups: int = 2
    repadapter_scale: float = 1.0
    ia3_feedforward: tuple[str, ...] = ("down_proj",)

    @classmethod
    def from_config(cls, cfg, method: str) -> "MethodSpec":
        """``cfg``: the whole Config (lora.* and peft.*)."""
        p, lo = cfg.peft, cfg.lora
        targets = tuple(lo.target_modules if method in ("lora", "dora") else p.target_modules or lo.target_modules)
        return cls(method=method, targets=targets, lora_rank=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                   repadapter_rank=p.repadapter_rank, repadapter_groups=p.repadapter_groups,
                   repadapter_scale=p.repadapter_scale, ia3_feedforward=tuple(p.ia3_feedforward))

    @staticmethod
    def targets_key(cfg, method: str) -> str:
        """The setting that names ``method``'s target layers (for error messages)."""
        return "peft.target_modules" if method not in ("lora", "dora") and cfg.peft.target_modules else \
            "lora.target_modules"

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


class SSFLinear(nn.Module):
    """``gamma * base(x) + beta``, per output channel; identity at the start."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base, self.disabled = base, False
        self.ssf_scale = nn.Parameter(torch.ones(base.out_features, device=base.weight.device))
        self.ssf_shift = nn.Parameter(torch.zeros(base.out_features, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.disabled:
            return y
        return (y.to(self.ssf_scale.dtype) * self.ssf_scale + self.ssf_shift).to(y.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        w, dtype = self.base.weight.double(), self.base.weight.dtype
        scale, shift = self.ssf_scale.double(), self.ssf_shift.double()
        b = self.base.bias.double() if self.base.bias is not None else torch.zeros_like(scale)
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=True, device=w.device, dtype=dtype)
        out.weight.copy_((scale[:, None] * w).to(dtype))
        out.bias.copy_((scale * b + shift).to(dtype))
        return out


class RepAdapterLinear(nn.Module):
    """``base(x + scale * U(D(x)))``: ``D`` dense ``in -> rank``, ``U`` block-diagonal
    ``rank -> in`` in ``groups`` groups (zero at the start, so the adapter starts as the identity)."""

    def __init__(self, base: nn.Linear, rank: int, groups: int, scale: float):
        super().__init__()
        d = base.in_features
        if rank % groups or d % groups:
            raise ValueError(f"peft.repadapter_groups={groups} must divide peft.repadapter_rank={rank} and the "
                             f"layer's input size {d}")
        self.base, self.groups, self.scale, self.disabled = base, groups, scale, False
        dev = base.weight.device
        self.repadapter_down = nn.Parameter(torch.empty(rank, d, device=dev))
        nn.init.xavier_uniform_(self.repadapter_down)
        self.repadapter_up = nn.Parameter(torch.zeros(groups, d // groups, rank // groups, device=dev))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.repadapter_down.dtype) @ self.repadapter_down.t()  # (..., rank)
        h = h.unflatten(-1, (self.groups, -1))  # (..., groups, rank / groups)
        return torch.einsum("...gr,gor->...go", h, self.repadapter_up).flatten(-2)  # (..., in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        return self.base(x + (self.scale * self.delta(x)).to(x.dtype))

    def dense_up(self) -> torch.Tensor:
        """``U`` as an ``(in, rank)`` matrix (block-diagonal)."""
        return torch.block_diag(*self.repadapter_up)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        w, dtype = self.base.weight.double(), self.base.weight.dtype
        a = self.scale * (self.dense_up().double() @ self.repadapter_down.double())  # (in, in)
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=w.device, dtype=dtype)
        out.weight.copy_((w + w @ a).to(dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


WRAPPERS = {"ssf": SSFLinear, "repadapter": RepAdapterLinear}


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of targets: the module's full name, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def _targets(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    targets = list(targets)
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(_matches(n, t) for t in targets)]
    missing = [t for t in targets if not any(_matches(n, t) for n, _ in found)]
    if missing:
        raise ValueError(f"method targets {missing} match no Linear layer of this model")
    return found


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def apply_method(model: nn.Module, spec: MethodSpec, task_type: str = "CAUSAL_LM", *,
                 init_identity: bool = True) -> nn.Module:
    """The model with ``spec.method`` on it and only the method's parameters trainable (all of them
    for ``full``; plus the score head for ``task_type="SEQ_CLS"``). ``init_identity=False``
    starts the method away from the identity (tests use it to see merges are exact)."""
    if spec.method == "full":
        return model
    if spec.method in PEFT_METHODS:
        return _apply_peft(model, spec, task_type, init_identity)
    if spec.method not in WRAPPERS:
        raise ValueError(f"unknown method {spec.method!r} (one of {', '.join(METHODS)})")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in _targets(model, spec.targets):
        if spec.method == "ssf":
            wrapped = SSFLinear(linear)
        else:
            wrapped = RepAdapterLinear(linear, spec.repadapter_rank, spec.repadapter_groups, spec.repadapter_scale)
        if not init_identity:
            with torch.no_grad():
                for p in wrapped.parameters(recurse=False):
                    p.add_(0.1 * torch.randn_like(p))
        _set(model, name, wrapped)
    if task_type == "SEQ_CLS":
        for p in model.score.parameters():
            p.requires_grad_(True)
    model.rlhf_ray_method = spec  # what merge_method and save_method read back
    return model


def _apply_peft(model: nn.Module, spec: MethodSpec, task_type: str, init_identity: bool) -> nn.Module:
    from peft import IA3Config, LoraConfig, get_peft_model

    save = ["score"] if task_type == "SEQ_CLS" else None
    if spec.method == "ia3":
        ff = [m for m in spec.ia3_feedforward if m in spec.targets]
        pc = IA3Config(target_modules=list(spec.targets), feedforward_modules=ff, task_type=task_type,
                       modules_to_save=save, init_ia3_weights=init_identity)
    else:
        pc = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                        target_modules=list(spec.targets), task_type=task_type, modules_to_save=save,
                        use_dora=spec.method == "dora", init_lora_weights=init_identity)
    peft_model = get_peft_model(model, pc)
    if not init_identity and spec.method == "ia3":
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "ia3_l" in n:
                    p.add_(0.1 * torch.randn_like(p))
    return peft_model


def method_of(model: nn.Module) -> Optional[MethodSpec]:
    """The rlhf-ray method (SSF, RepAdapter) on ``model``, if any."""
    return getattr(model, "rlhf_ray_method", None)


def merge_method(model: nn.Module) -> nn.Module:
    """A plain model with the method folded into its weights: PEFT's ``merge_and_unload`` for
    LoRA/DoRA/IA3, the exact folds above for SSF and RepAdapter; ``full`` as it is."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    spec = method_of(model)
    if spec is None:
        return model
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, (SSFLinear, RepAdapterLinear))]
    needs_bias = {n.rsplit(".", 1)[-1] for n, m in wrapped if isinstance(m, SSFLinear) and m.base.bias is None}
    flags = _bias_flags(model, needs_bias)
    for name, module in wrapped:
        _set(model, name, module.merged())
    for flag in flags:  # the config now gives every layer of the group a bias: those not shifted get zeros
        setattr(model.config, flag, True)
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.Linear) and m.bias is None and name.rsplit(".", 1)[-1] in BIAS_FLAGS[flag]:
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                      requires_grad=False)
    del model.rlhf_ray_method
    return model


def _bias_flags(model: nn.Module, leaves: set[str]) -> list[str]:
    """The config flags that give the bias-free ``leaves`` a bias in a saved model; a clear error
    where the architecture has none (the merged model could not be loaded back)."""
    flags, config = [], getattr(model, "config", None)
    for leaf in sorted(leaves):
        flag = next((f for f, group in BIAS_FLAGS.items() if leaf in group and hasattr(config, f)), None)
        if flag is None:
            kind = getattr(config, "model_type", type(model).__name__)
            raise ValueError(f"method ssf: {leaf} has no bias and a {kind} model has no config flag that gives "
                             "it one, so SSF's shift cannot be merged; target layers with a bias, or use "
                             "method repadapter (no bias needed)")
        if flag not in flags:
            flags.append(flag)
    return flags


def is_method_param(name: str) -> bool:
    """Whether a parameter name is one of SSF's or RepAdapter's own tensors."""
    return name.rsplit(".", 1)[-1].startswith(("ssf_", "repadapter_"))


def method_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's own tensors (SSF/RepAdapter), by their names in the model."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if is_method_param(n)}


def save_method(model: nn.Module, out: Path) -> Path:
    """The unmerged method as a directory: PEFT's own format for LoRA/DoRA/IA3; for SSF and
    RepAdapter ``adapter_config.json`` (the method and its settings) + ``adapter_model.safetensors``."""
    from safetensors.torch import save_file

    out = Path(out)
    if hasattr(model, "peft_config"):
        model.save_pretrained(out)
        return out
    spec = method_of(model)
    if spec is None:
        raise ValueError("save_method: the model has no method on it (full fine-tuning saves the model itself)")
    out.mkdir(parents=True, exist_ok=True)
    tensors = method_state(model)
    score = getattr(model, "score", None)
    if score is not None and any(p.requires_grad for p in score.parameters()):
        tensors.update({f"score.{k}": v.detach().cpu().clone() for k, v in score.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"rlhf_ray_method": spec.method, **spec.to_json()}, indent=2))
    return out


def load_method(model: nn.Module, path: Path, task_type: str = "CAUSAL_LM") -> nn.Module:
    """``model`` with the method saved at ``path`` put back on it (unmerged)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    if "rlhf_ray_method" not in meta:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(path))
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items() if k != "rlhf_ray_method"}
    spec = MethodSpec(**fields)
    model = apply_method(model, spec, task_type)
    tensors = load_file(str(path / WEIGHTS_FILE))
    own = {n for n, _ in model.named_parameters() if is_method_param(n)}
    missing = own - set(tensors)
    if missing:
        raise ValueError(f"{path / WEIGHTS_FILE}: no tensors for {sorted(missing)[:3]} (another model or settings?)")
    result = model.load_state_dict(tensors, strict=False)
    unexpected = [k for k in result.unexpected_keys]
    if unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE}: tensors this model does not have: {unexpected[:3]}")
    return model


def method_params(linears: Iterable[tuple[str, int, int]], spec: MethodSpec) -> int:
    """Trainable parameters of ``spec`` on these Linear layers, ``(last name, in, out)`` each,
    from shapes alone (the planner's count; the tests hold it to the real modules'). ``full``:
    not counted here (every parameter of the model)."""
    r, g, total = spec.repadapter_rank, spec.repadapter_groups, 0
    leaves = {t.rsplit(".", 1)[-1] for t in spec.targets}
    for leaf, fan_in, fan_out in linears:
        if leaf not in leaves:
            continue
        if spec.method in ("lora", "dora"):
            total += spec.lora_rank * (fan_in + fan_out) + (fan_out if spec.method == "dora" else 0)
        elif spec.method == "ia3":
            total += fan_in if leaf in spec.ia3_feedforward else fan_out
        elif spec.method == "ssf":
            total += 2 * fan_out
        elif spec.method == "repadapter":
            total += r * fan_in + fan_in * (r // g)
    return total


# -- PPO with a method vLLM cannot serve: the learner publishes merged weights -----------------
# Layers vLLM fuses into one (q/k/v -> qkv_proj, gate/up -> gate_up_proj): its in-place reload
# rebuilds a fused layer from all of its parts, so a publish sends every part of a touched one.
FUSED = {"q_proj": ("q_proj", "k_proj", "v_proj"), "k_proj": ("q_proj", "k_proj", "v_proj"),
         "v_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj"),
         "up_proj": ("gate_proj", "up_proj")}


class MethodPolicy(nn.Module):
    """The part of PEFT's model interface the learner's policy uses (``get_base_model``,
    ``disable_adapter``), for SSF, RepAdapter and full fine-tuning."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def get_base_model(self) -> nn.Module:
        return self.model

    @contextlib.contextmanager
    def disable_adapter(self):
        """The base alone: the reference policy without a second copy (SSF, RepAdapter)."""
        wrapped = [m for m in self.model.modules() if isinstance(m, (SSFLinear, RepAdapterLinear))]
        if not wrapped:
            raise RuntimeError("full fine-tuning has no adapter to switch off for the reference: set "
                               "reference.mode=separate")
        for m in wrapped:
            m.disabled = True
        try:
            yield
        finally:
            for m in wrapped:
                m.disabled = False


def merged_tensors(model: nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """What the generators load for the current weights, under transformers' names, on the CPU:
    every parameter for full fine-tuning; else each wrapped layer merged, with the other parts
    of a fused layer it belongs to, and (SSF) a zero bias where a sent layer has none, since the
    engine's model has biases for the SSF groups (``ssf_engine_base``)."""
    spec = method_of(model)
    if spec is None:
        return {n: p.detach().to("cpu", dtype or p.dtype, copy=True).contiguous() for n, p in model.state_dict().items()}
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, (SSFLinear, RepAdapterLinear))}
    names = set(wrapped)
    for n in wrapped:
        parent, _, leaf = n.rpartition(".")
        names.update(f"{parent}.{sib}" if parent else sib for sib in FUSED.get(leaf, ()))
    out = {}
    for n in sorted(names):
        lin = wrapped[n].merged() if n in wrapped else model.get_submodule(n)
        dt = dtype or lin.weight.dtype
        out[f"{n}.weight"] = lin.weight.detach().to("cpu", dt, copy=True).contiguous()
        if lin.bias is not None:
            out[f"{n}.bias"] = lin.bias.detach().to("cpu", dt, copy=True).contiguous()
        elif spec.method == "ssf":
            out[f"{n}.bias"] = torch.zeros(lin.out_features, dtype=dt)
    return out


def ssf_engine_base(model_path: str, spec: MethodSpec, out: Path, dtype: str = "float32") -> Path:
    """The base with an identity SSF merged in: the same outputs, plus zero biases in the SSF
    groups (``attention_bias`` / ``mlp_bias`` on), so the engines have the bias parameters each
    published version fills. Reused when ``out`` already holds it for the same base and spec."""
    from transformers import AutoTokenizer

    from .loading import load_causal_lm

    out = Path(out)
    marker = out / "rlhf_ray_engine_base.json"
    key = {"base": str(model_path), **spec.to_json()}
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return out
    model = merge_method(apply_method(load_causal_lm(model_path, dtype), spec))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    marker.write_text(json.dumps(key))
    return out
