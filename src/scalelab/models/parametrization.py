"""Parametrizations — SP, μP and depth-μP (CompleteP) — applied to any model of `models/protocol.py`.

A parametrization decides three things, and this module sets all of them on an already built model:
  1. init scales of every weight (re-initialises the model, from torch's global RNG, in parameter order);
  2. per-parameter-group multipliers of the learning rate, weight decay and Adam ε (returned as param-group
     dicts; the trainer multiplies its base values by them);
  3. the model's multiplier attributes (attention scale, residual-branch multiplier, readout multiplier).

Parameters are classified by shape, as the `mup` package's infshapes do, never by attribute names: the
model's family is built again at twice the width (on the meta device) and each parameter's dimensions
that grew are its "infinite" ones. Both infinite → **hidden** matrix; the token/position embeddings and
linear layers whose output grows from a fixed input → **input**; the readout (`head`, a linear layer from
the width to a fixed vocabulary) → **output**; anything else (norm weights, biases, fixed-size tensors)
→ **vector** (a 1-D `bias` starts at zero, any other vector — a norm's gain — at one). Linear layers flagged `residual_out` (they write into the residual stream) are hidden
matrices whose init also shrinks with depth.

* **SP** (standard, GPT-2 style): every weight N(0, σ²); residual output projections (attn.proj,
  mlp.proj) N(0, σ²/(2L)); attention 1/sqrt(d_head); all LR multipliers 1.
* **μP** (Tensor Programs V, Table 3/8, Adam variant, written with a readout multiplier):
  - input weights (token/position embeddings): N(0, σ²), LR ×1;
  - hidden matrices (GPT: qkv, attn.proj, mlp.fc, mlp.proj): std σ/sqrt(m_N) (∝ 1/sqrt(fan_in)), and the
    residual projections additionally /sqrt(2L) as in SP; LR ×1/m_N;
  - readout: logits × α_out/m_N (`output_multiplier`); its weight (tied: the token embedding) keeps
    N(0, σ²) and LR ×1;
  - attention scale sqrt(d_head_base)/d_head, i.e. ∝ 1/d_head and equal to SP's 1/sqrt(d_head) at the
    base width — so μP at the base shape *is* SP, and base hyperparameters carry over.
* **depth-μP / CompleteP** (Dey et al. 2025, α = 1 convention): μP in width plus
  - residual-branch multiplier 1/m_L = base_depth/depth (α = 1; α = 1/2 would be 1/sqrt(m_L));
  - hidden LR ×1/m_N · m_L^(α-1) = ×1/m_N (no depth correction at α = 1);
  - hidden weight decay ×m_N so that the decoupled decay lr·λ is width independent;
  - Adam ε ×1/(m_N · m_L^α) for hidden matrices; norms and embeddings unchanged;
  - residual projections are not shrunk by 1/sqrt(2L) (the branch multiplier handles depth) but by the
    constant 1/sqrt(2·base_depth), so the base shape again equals SP.

α_out (`model.output_multiplier`, default 1) is a base hyperparameter like the LR: tuned at the base
width, carried to every width by μP's 1/m_N (in SP it multiplies the logits at every width). It matters:
with tied embeddings at σ = 0.02 the default readout is too weak for short runs — on the built-in corpus
(depth 2, 160 steps, docs/transfer.md) α_out = 4 lowers the width-64 loss from 2.64 to 2.38, and with it
μP's width-256 loss (2.33) comes within 0.05 of SP's best at 256 while μP's LR optimum stays put.

Weight-decay rule (all parametrizations): decay only 2-D hidden matrices and an untied readout matrix;
never norms, never embeddings (token, position, and the tied readout, which is the token embedding).

`coord_check` is the standard sanity check: train a few steps at several widths and tabulate per-layer
activation RMS; μP's columns stay flat across width, SP's grow.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from scalelab.models.flops import ModelShape
from scalelab.models.registry import build, build_model
from scalelab.spec import ModelSpec

#: the CompleteP depth exponent used by `depth_mup` (1: residual branches scaled by base_depth/depth).
COMPLETEP_ALPHA = 1.0
#: shape classes (see the module docstring) and the optimizer group each one goes to.
GROUP_OF_CLASS = {"input": "embedding", "hidden": "hidden", "vector": "norm", "output": "readout"}


def _infinite_dims(shape: ModelShape) -> dict[str, tuple[bool, ...]]:
    """For every parameter of the family's model at `shape`: which of its dimensions grow with width."""
    with torch.device("meta"):
        here = dict(build(shape).named_parameters())
        wider = dict(build(shape.with_width(2 * shape.width)).named_parameters())
    return {
        name: tuple(a != b for a, b in zip(p.shape, wider[name].shape, strict=True))
        for name, p in here.items()
    }


def shape_classes(model: nn.Module) -> dict[str, str]:
    """Parameter name → "input" | "hidden" | "output" | "vector", by which dimensions scale with width."""
    infinite = _infinite_dims(model.shape)
    owner = {
        f"{mod_name}.{p_name}".lstrip("."): mod
        for mod_name, mod in model.named_modules()
        for p_name, _ in mod.named_parameters(recurse=False)
    }
    readout = model.head.weight
    classes = {}
    for name, p in model.named_parameters():
        inf, mod = infinite[name], owner[name]
        if p is readout and not model.shape.tie_embeddings:
            classes[name] = "output"
        elif len(inf) == 2 and all(inf):
            classes[name] = "hidden"
        elif len(inf) == 2 and (isinstance(mod, nn.Embedding) or (inf[0] and not inf[1])):
            classes[name] = "input"  # an embedding (V, d), or a linear layer fixed fan-in → width
        else:
            classes[name] = "vector"
    return classes


def _modules_with(model: nn.Module, *attrs: str) -> list[nn.Module]:
    return [m for m in model.modules() if all(hasattr(m, a) for a in attrs)]


@torch.no_grad()
def apply_parametrization(model: nn.Module, model_spec: ModelSpec) -> list[dict[str, Any]]:
    """Re-initialise `model` and set its multipliers for `model_spec.parametrization`.

    Returns optimizer param groups: dicts with `params`, `name`, `lr_mult`, `wd_mult`, `eps_mult`
    (the trainer sets lr = base_lr·schedule·lr_mult, weight_decay = base_wd·wd_mult, eps = base_eps·eps_mult).
    Every parameter of the model is in exactly one group.
    """
    kind = model_spec.parametrization
    sigma = model_spec.init_std
    depth = len(model.blocks)
    m_n = model.shape.width / model_spec.base_width if kind != "sp" else 1.0
    m_l = depth / model_spec.base_depth if kind == "depth_mup" else 1.0

    hidden_std = sigma / math.sqrt(m_n)
    if kind == "depth_mup":
        resid_std = hidden_std / math.sqrt(2 * model_spec.base_depth)
        residual_multiplier = m_l ** (-COMPLETEP_ALPHA)
    else:
        resid_std = hidden_std / math.sqrt(2 * depth)
        residual_multiplier = 1.0

    # 1. init, in parameter order (the RNG draws of a family never depend on the parametrization)
    classes = shape_classes(model)
    residual = {id(m.weight) for m in _modules_with(model, "residual_out", "weight")}
    params = dict(model.named_parameters())
    for name, cls in classes.items():
        p = params[name]
        if cls == "hidden":
            nn.init.normal_(p, std=resid_std if id(p) in residual else hidden_std)
        elif cls in ("input", "output") or p.ndim >= 2:
            nn.init.normal_(p, std=sigma)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.ones_(p)  # a norm's gain

    # 3. multipliers
    alpha_out = model_spec.output_multiplier
    model.output_multiplier = alpha_out / m_n if kind != "sp" else alpha_out
    for attn in _modules_with(model, "scale", "d_head"):
        if kind == "sp":
            attn.scale = None
        else:
            base_d_head = model_spec.base_width / model.shape.n_heads
            attn.scale = math.sqrt(base_d_head) / attn.d_head
    for block in _modules_with(model, "residual_multiplier"):
        block.residual_multiplier = residual_multiplier

    # 2. groups
    mults = {
        "hidden": (
            1.0 / m_n,
            m_n if kind == "depth_mup" else 1.0,
            1.0 / (m_n * m_l**COMPLETEP_ALPHA) if kind == "depth_mup" else 1.0,
        ),
        "embedding": (1.0, 0.0, 1.0),
        "norm": (1.0, 0.0, 1.0),
        "readout": (1.0, 1.0, 1.0),
    }
    groups: list[dict[str, Any]] = []
    for group_name, (lr_mult, wd_mult, eps_mult) in mults.items():
        members = [params[n] for n, c in classes.items() if GROUP_OF_CLASS[c] == group_name]
        if members or group_name != "readout":
            groups.append(
                {
                    "name": group_name,
                    "params": members,
                    "lr_mult": lr_mult,
                    "wd_mult": wd_mult,
                    "eps_mult": eps_mult,
                }
            )
    _check_groups(model, groups)
    return groups


def _check_groups(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    seen: set[int] = set()
    for g in groups:
        for p in g["params"]:
            if id(p) in seen:
                raise AssertionError(f"parameter in two groups (group {g['name']})")
            seen.add(id(p))
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missing:
        raise AssertionError(f"parameters in no optimizer group: {missing}")


# ------------------------------------------------------------------------------------ coord check
def coord_check(
    widths: list[int],
    parametrization: str,
    steps: int = 4,
    *,
    depth: int = 2,
    n_heads: int = 4,
    context_tokens: int = 32,
    vocab_size: int = 128,
    batch_size: int = 4,
    lr: float = 1e-2,
    base_width: int | None = None,
    seed: int = 0,
    family: str = "gpt2",
) -> list[dict[str, Any]]:
    """Train each width for `steps` Adam steps on fixed random tokens; per-layer activation RMS per step.

    Returns rows `{"width", "step", "layer", "rms"}` with layers `embedding`, `block.{i}` (residual stream
    after block i), `logits`. Step 0 is at init. In μP (`"mup"`/`"depth_mup"`) the RMS of every layer
    at a given step is roughly independent of width; in SP the later-step logits grow with width.
    `base_width` defaults to the smallest width.
    """
    base = base_width or min(widths)
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab_size, (batch_size, context_tokens + 1), generator=gen)
    x, y = data[:, :-1], data[:, 1:]
    rows: list[dict[str, Any]] = []
    for width in widths:
        spec = ModelSpec(
            n_heads=n_heads,
            width=width,
            depth=depth,
            context_tokens=context_tokens,
            vocab_size=vocab_size,
            parametrization=parametrization,
            base_width=base,
            base_depth=depth,  # type: ignore[arg-type]
            family=family,
        )
        torch.manual_seed(seed)
        model = build_model(spec)
        groups = apply_parametrization(model, spec)
        opt = torch.optim.Adam(
            [{"params": g["params"], "lr": lr * g["lr_mult"]} for g in groups], lr=lr, betas=(0.9, 0.95)
        )
        acts: dict[str, torch.Tensor] = {}

        def record(name: str, acts: dict[str, torch.Tensor] = acts) -> Any:
            return lambda module, inputs, output: acts.__setitem__(name, output)

        hooks = [model.embedding.register_forward_hook(record("embedding"))]
        for i, block in enumerate(model.blocks):
            hooks.append(block.register_forward_hook(record(f"block.{i}")))
        for step in range(steps + 1):
            logits = model(x)
            acts["logits"] = logits
            for name, a in acts.items():
                rows.append(
                    {
                        "width": width,
                        "step": step,
                        "layer": name,
                        "rms": float(a.detach().float().pow(2).mean().sqrt()),
                    }
                )
            if step == steps:
                break
            loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab_size), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for h in hooks:
            h.remove()
    return rows
