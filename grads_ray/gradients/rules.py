"""Which exact per-example gradient rule covers each trainable parameter of a model (decided once,
when the engine is built), and the build-time probes behind those decisions.

Rules (docs/score_engine.md has the math of each):

- ``linear``: ``nn.Linear`` (peft LoRA adapters too) and transformers' ``Conv1D`` (``conv1d``), on
  any token layout (``layout.token_layout``): G_i = Σ_t δ_t a_tᵀ.
- ``embedding``: ``nn.Embedding`` and its subclasses. The lookup itself (``F.embedding`` or an index
  into the weight) is caught inside the module's call, so what the module does around it (Gemma's
  √d scale, OPT's position offset, CTRL's in-place scale) is on the δ side: G_i = Σ_t e_{x_t} δ_tᵀ.
- ``norm``: the elementwise weight (and bias) of a norm layer: Σ_t δ_t ⊙ ∂y_t/∂w, ∂y/∂w in closed
  form where it checks out against forward-mode AD of the module, else forward-mode AD itself.
- ``router``: a module whose only parameters are a matrix (and a bias) and whose (first) output is
  ``F.linear`` of its input, checked on a probe: MoE routers on flattened tokens.
- ``experts``: transformers' 3-D expert weights (``@use_experts_implementation`` modules: Mixtral,
  Qwen2/3-MoE, OLMoE, DeepSeek-V3, …), scored through ``gradients.experts``.
- ``replay``: any other parameter of at most :data:`REPLAY_MAX` entries (attention sinks, λ's of
  differential attention, learned activation slopes, a norm whose weight is not elementwise): its
  module called again on the same inputs with only that parameter live, and one vector-Jacobian
  product per example. Exact for any module whose examples do not interact; costs B backward passes
  of that module, so it is kept for small parameters.

Anything else is refused by name (:class:`UnsupportedModel`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from grads_ray.gradients.factored import HALF

REPLAY_MAX = 1 << 20  # entries of a parameter the replay rule forms per example
LOOP_HINT = "score.engine=loop (or auto) scores it one example at a time"


class UnsupportedModel(ValueError):
    """A trainable parameter the batched engine has no exact rule for, or an input it cannot place."""


def conv1d_type() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (Conv1D,)


EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
EXPERT_BIASES = ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


def is_experts(module: nn.Module) -> bool:
    """transformers' experts module: 3-D ``down_proj`` and ``gate_up_proj``/``up_proj`` weights, the
    layout flags ``@use_experts_implementation`` sets."""
    if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed")):
        return False
    down = getattr(module, "down_proj", None)
    return isinstance(down, nn.Parameter) and down.dim() == 3


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


@dataclass
class Entry:
    attr: str  # the parameter's attribute on the module
    name: str  # its name among the model's parameters
    rule: str


@dataclass
class Use:
    """One module whose own parameters the engine scores, and how."""

    path: str
    module: nn.Module
    entries: list[Entry]
    jacobians: dict[str, Callable] = field(default_factory=dict)  # norm weights: attr -> ∂y/∂w

    def rules(self) -> set[str]:
        return {e.rule for e in self.entries}


def _specific_rule(module: nn.Module, attr: str, p: nn.Parameter, router: Callable[[], bool]) -> str | None:
    if isinstance(module, nn.Linear) and attr in ("weight", "bias"):
        return "linear"
    if isinstance(module, conv1d_type()) and attr in ("weight", "bias"):
        return "conv1d"
    if isinstance(module, nn.Embedding) and attr == "weight":
        return "embedding"
    if is_experts(module) and attr in EXPERT_WEIGHTS + EXPERT_BIASES:
        return "experts"
    if is_norm(module) and p.dim() == 1 and attr in ("weight", "bias"):
        return "norm"
    if attr in ("weight", "bias") and router():
        return "router"
    return None


def plan(model: nn.Module, params: dict[str, nn.Parameter]) -> list[Use]:
    """Each trainable parameter -> the module(s) that use it and the rule for each use; raises
    :class:`UnsupportedModel` naming every parameter no rule covers. A parameter registered in
    several modules (a tied weight) is scored at every module with a specific rule (an embedding and
    the head it is tied to); the replay rule is the fallback, at its outermost owner only."""
    names = {id(p): n for n, p in params.items()}
    uses: dict[int, Use] = {}
    order: list[int] = []
    generic: dict[str, tuple[str, nn.Module, str]] = {}  # param -> its outermost owner, for ``replay``
    covered: set[str] = set()
    for path, module in model.named_modules():
        own = [(a, p) for a, p in module.named_parameters(recurse=False) if id(p) in names]
        if not own:
            continue
        cache: dict[str, bool] = {}

        def router(module=module, cache=cache) -> bool:
            if "r" not in cache:
                cache["r"] = is_router(module)
            return cache["r"]

        for attr, p in own:
            name = names[id(p)]
            rule = _specific_rule(module, attr, p, router)
            if rule is None:
                generic.setdefault(name, (path, module, attr))
                continue
            if id(module) not in uses:
                uses[id(module)] = Use(path, module, [])
                order.append(id(module))
            uses[id(module)].entries.append(Entry(attr, name, rule))
            covered.add(name)
    out = [uses[i] for i in order]
    for use in out:  # a norm whose weight is not elementwise, or that takes more than x: replayed
        for e in use.entries:
            if e.rule == "norm":
                fn = norm_jacobian(use.module, e.attr)
                if fn is None:
                    e.rule = "replay"
                elif e.attr != "bias":
                    use.jacobians[e.attr] = fn
    refused = []
    for name, (path, module, attr) in generic.items():
        if name in covered:
            continue
        if id(module) not in uses:
            uses[id(module)] = Use(path, module, [])
            out.append(uses[id(module)])
        uses[id(module)].entries.append(Entry(attr, name, "replay"))
        covered.add(name)
    for use in out:
        for e in use.entries:
            n = params[e.name].numel()
            if e.rule == "replay" and n > REPLAY_MAX:
                refused.append(f"{e.name} ({type(use.module).__name__}, {n:,} entries)")
    if refused:
        raise UnsupportedModel("no batched per-example gradient rule for: " + ", ".join(refused) + "; " + LOOP_HINT)
    return out


# -- probes ---------------------------------------------------------------------------------------

def _tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)


def first_tensor(output):
    """A module's output, or the first tensor of a tuple/list/ModelOutput; None if there is none."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    return None


def is_router(module: nn.Module) -> bool:
    """A module whose own parameters are a matrix ``weight`` (out, in) and maybe a vector ``bias``,
    with no parameters below it, whose first output is ``F.linear(input, weight, bias)`` of its one
    input, flattened or not: checked on a random probe."""
    own = dict(module.named_parameters(recurse=False))
    w = own.get("weight")
    if w is None or w.dim() != 2 or set(own) - {"weight", "bias"} or any(True for _ in _child_params(module)):
        return False
    b = own.get("bias")
    if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0]):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 3, w.shape[1]), generator=gen, dtype=torch.float64).to(w.device, w.dtype)
    try:
        with torch.no_grad():
            y = first_tensor(module(x))
            want = nn.functional.linear(x.to(torch.float64), w.double(), None if b is None else b.double())
    except Exception:  # noqa: BLE001 - a module that does not take one tensor is no router
        return False
    if y is None or y.numel() != want.numel() or y.shape[-1] != w.shape[0]:
        return False
    return bool(torch.allclose(y.double().reshape(want.shape), want, rtol=_tol(w.dtype), atol=_tol(w.dtype)))


def _child_params(module: nn.Module):
    for child in module.children():
        yield from child.parameters()


# -- norms: ∂y/∂w ---------------------------------------------------------------------------------

def elementwise_jacobian(module: nn.Module, attr: str, x: torch.Tensor) -> torch.Tensor:
    """∂y/∂w_k for an elementwise parameter w of ``module`` (y[..., k] depends on w[k] alone): the
    forward-mode derivative along w = ones. x (..., d) -> (..., d)."""
    from torch.func import functional_call, jvp

    w = getattr(module, attr)
    _, tangent = jvp(lambda v: functional_call(module, {attr: v}, (x,)), (w.detach(),), (torch.ones_like(w),))
    return tangent


@dataclass(frozen=True)
class NormHat:
    """∂y/∂w of a norm's elementwise weight in closed form: the normalised input x̂ (``layer``: LayerNorm
    over the last ``shape``; ``rms32``: x / rms(x) computed in float32, as transformers' RMSNorms do;
    ``rms``: in x's dtype), or ∂y/∂b = 1 (``ones``). Any leading dims: norms of one kind and ``eps`` are
    evaluated on a stack of their inputs at once."""

    kind: str
    eps: float = 0.0
    shape: tuple[int, ...] = ()

    def __call__(self, module: nn.Module | None, attr: str | None, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "ones":
            return torch.ones_like(x)
        if self.kind == "layer":
            return nn.functional.layer_norm(x, self.shape, None, None, self.eps)
        if self.kind == "rms32" and x.dtype in HALF:  # half x read as it is: its mean
            # square in one float32 reduction, no float32 copy of x nor of its square (a stack of every layer's)
            ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_().div_(x.shape[-1])
            return (x * torch.rsqrt(ms + self.eps)).to(x.dtype)
        xf = x.float() if self.kind == "rms32" else x
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def norm_jacobian(module: nn.Module, attr: str):
    """The cheapest correct way to get ∂y/∂w for a norm's elementwise parameter: the normalised input
    x̂ in closed form (LayerNorm; RMSNorm, including the (1 + w) variants) when it agrees with
    forward-mode AD of the module on a random input, else forward-mode AD itself (a few times slower
    through torch.func); for a bias, ∂y/∂b = 1 (checked). -> f(module, attr, x) -> (..., d), or
    None when the parameter is not elementwise (y[..., k] depends on w[j≠k]) or the module takes more
    than one tensor: the replay rule covers those."""
    from torch.func import functional_call, jvp

    w = getattr(module, attr)
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn((2, 3, w.shape[0]), generator=gen, dtype=torch.float64).to(w.device, w.dtype)
    tangent = torch.rand(w.shape, generator=gen, dtype=torch.float64).to(w.device, w.dtype) + 0.5
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(w.dtype, 1e-2)  # the same arithmetic, up to rounding
    with torch.no_grad():
        try:
            want = elementwise_jacobian(module, attr, probe).double()
            _, along = jvp(lambda v: functional_call(module, {attr: v}, (probe,)), (w.detach(),), (tangent,))
        except Exception:  # noqa: BLE001 - a norm that takes more than x
            return None
        # structure, not rounding: an entry that mixes with others is off by O(1); a module that computes
        # in float32 whatever its dtype rounds at 1e-7
        if want.shape != probe.shape or not torch.allclose(along.double(), want * tangent.double(),
                                                           rtol=max(10 * tol, 1e-4), atol=max(10 * tol, 1e-4)):
            return None
        if attr == "bias":
            return NormHat("ones") if torch.allclose(want, torch.ones_like(want)) else None
        candidates = []
        if isinstance(module, nn.LayerNorm) and attr == "weight":
            candidates.append(NormHat("layer", float(module.eps), tuple(module.normalized_shape)))
        elif attr == "weight" and "rms" in type(module).__name__.lower():
            eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
            candidates += [NormHat("rms32", eps), NormHat("rms", eps)]
        for fn in candidates:
            got = fn(module, attr, probe).double()
            if got.shape == want.shape and torch.allclose(got, want, rtol=tol, atol=tol):
                return fn
    return elementwise_jacobian
