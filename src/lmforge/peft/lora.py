"""LoRA: low-rank adapters swapped into a model's linear layers (Hu et al. 2021, "LoRA", eq. 3).

A targeted ``nn.Linear`` W is replaced by ``LoRALinear(W)``, computing W x + (alpha / r) B A x
with A (r x in) and B (out x r); with rsLoRA the scale is alpha / sqrt(r) (Kalajdzievski 2023).
B starts at zero, so an untrained adapter changes nothing. A is drawn from a ``torch.Generator``
when one is given (a run's seed: the same seed, the same adapter, whatever ran before), else from
torch's global generator. The base weight stays frozen (and may be a quantised layer from
``deploy/quantize.py``). Modules are swapped in place; the model class is never subclassed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.models.quantized import LINEAR_LAYERS, QUANTIZED_LINEARS


@dataclass
class LoraSpec:
    """Which layers get adapters and how big they are."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise LmforgeError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise LmforgeError(f"LoRA alpha must be a finite number > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise LmforgeError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen base linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        w = base.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)
        if generator is None:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear's default init
        else:  # the same draw on any device: made on the CPU generator, then copied
            a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            with torch.no_grad():
                self.lora_A.weight.copy_(a)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True
        for p in base.parameters():
            p.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A: the (out, in) update this adapter adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled and not self.merged:
            y = y + self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))).to(y.dtype) * self.scaling
        return y

    def merge(self) -> None:
        if not self.merged:
            if not isinstance(self.base, nn.Linear):
                raise LmforgeError("cannot merge into a quantised base layer; load the base in float to merge")
            with torch.no_grad():
                self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the model's linear layers (LoRA candidates), the output head and the layers
    inside existing adapters excluded. Quantised linear layers count."""
    adapted = tuple(name + "." for name, _ in lora_layers(model))
    return [name for name, m in model.named_modules()
            if isinstance(m, LINEAR_LAYERS) and not name.startswith(adapted)
            and not name.endswith(("lm_head", "classifier"))]


def match_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """The module names a target spec selects.

    ``"all-linear"``: every linear layer but the output head; a string: a regular expression that
    must match the whole module name; a list: module names equal to an entry or ending in
    ``"." + entry`` (``["q_proj", "v_proj"]``).
    """
    candidates = linear_names(model)
    if targets == "all-linear":
        chosen = candidates
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise LmforgeError(f"LoRA target regex {targets!r} is invalid: {e}") from None
        chosen = [n for n in candidates if pattern.fullmatch(n)]
    else:
        chosen = [n for n in candidates if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise LmforgeError(f"LoRA targets {targets!r} match no linear layer; available names: {', '.join(leaves)} "
                           "(or 'all-linear', or a regex over full names such as 'model.layers.0.self_attn.q_proj')")
    return chosen


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def add_lora(model: nn.Module, spec: LoraSpec, names: list[str] | None = None,
             generator: torch.Generator | None = None) -> list[str]:
    """Freeze the model and swap LoRALinear into the targeted layers; returns their names. The A matrices
    are drawn from ``generator`` (in layer order) when given, else from torch's global generator."""
    names = match_targets(model, spec.targets) if names is None else names
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, child = _parent(model, name)
        setattr(parent, child, LoRALinear(getattr(parent, child), spec.r, spec.alpha, spec.dropout, spec.rslora,
                                          generator=generator))
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter on or off: off, the model is exactly its base (the frozen reference)."""
    for _, m in lora_layers(model):
        m.enabled = enabled


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain linear layers back."""
    for name, m in list(lora_layers(model)):
        m.merge()
        parent, child = _parent(model, name)
        setattr(parent, child, m.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_report(model: nn.Module) -> str:
    """e.g. "1.8M of 136M parameters trainable (1.35%)"."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():  # quantised layers keep their weights as buffers, not parameters
        if isinstance(m, QUANTIZED_LINEARS):
            total += m.num_weights

    def human(n: int) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"

    return f"{human(trainable)} of {human(total)} parameters trainable ({100 * trainable / max(total, 1):.2f}%)"
