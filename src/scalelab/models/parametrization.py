"""Parametrizations — SP, μP and depth-μP (CompleteP) — applied to a GPT from the outside.

A parametrization decides three things, and this module sets all of them on an already built model:
  1. init scales of every weight (re-initialises the model, from torch's global RNG);
  2. per-parameter-group multipliers of the learning rate, weight decay and Adam ε (returned as param-group
     dicts; the trainer multiplies its base values by them);
  3. the model's multiplier attributes (attention scale, residual-branch multiplier, readout multiplier).

Notation: m_N = width / base_width, m_L = depth / base_depth, σ = model_spec.init_std, L = depth.

* **SP** (standard, GPT-2 style): every weight N(0, σ²); residual output projections (attn.proj,
  mlp.proj) N(0, σ²/(2L)); attention 1/sqrt(d_head); all LR multipliers 1.
* **μP** (Tensor Programs V, Table 3/8, Adam variant, written with a readout multiplier):
  - input weights (token/position embeddings): N(0, σ²), LR ×1;
  - hidden matrices (qkv, attn.proj, mlp.fc, mlp.proj): std σ/sqrt(m_N) (∝ 1/sqrt(fan_in)), and the
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

from scalelab.models.gpt import GPT, build_model
from scalelab.spec import ModelSpec

#: the CompleteP depth exponent used by `depth_mup` (1: residual branches scaled by base_depth/depth).
COMPLETEP_ALPHA = 1.0


def _hidden_modules(model: GPT) -> list[tuple[str, nn.Linear, bool]]:
    """(name, linear, is_residual_projection) for every hidden matrix."""
    out = []
    for i, block in enumerate(model.blocks):
        out.append((f"blocks.{i}.attn.qkv", block.attn.qkv, False))
        out.append((f"blocks.{i}.attn.proj", block.attn.proj, True))
        out.append((f"blocks.{i}.mlp.fc", block.mlp.fc, False))
        out.append((f"blocks.{i}.mlp.proj", block.mlp.proj, True))
    return out


@torch.no_grad()
def apply_parametrization(model: GPT, model_spec: ModelSpec) -> list[dict[str, Any]]:
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

    # 1. init
    nn.init.normal_(model.tok_emb.weight, std=sigma)
    nn.init.normal_(model.pos_emb.weight, std=sigma)
    for _, lin, is_resid in _hidden_modules(model):
        nn.init.normal_(lin.weight, std=resid_std if is_resid else hidden_std)
    if not model.shape.tie_embeddings:
        nn.init.normal_(model.head.weight, std=sigma)
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm):
            nn.init.ones_(mod.weight)

    # 3. multipliers
    d_head = model.shape.width // model.shape.n_heads
    alpha_out = model_spec.output_multiplier
    if kind == "sp":
        attn_scale = None
        model.output_multiplier = alpha_out
    else:
        base_d_head = model_spec.base_width / model.shape.n_heads
        attn_scale = math.sqrt(base_d_head) / d_head
        model.output_multiplier = alpha_out / m_n
    for block in model.blocks:
        block.attn.scale = attn_scale
        block.residual_multiplier = residual_multiplier

    # 2. groups
    hidden_lr = 1.0 / m_n
    hidden_wd = m_n if kind == "depth_mup" else 1.0
    hidden_eps = 1.0 / (m_n * m_l**COMPLETEP_ALPHA) if kind == "depth_mup" else 1.0
    hidden = [lin.weight for _, lin, _ in _hidden_modules(model)]
    norms = [m.weight for m in model.modules() if isinstance(m, nn.LayerNorm)]
    groups: list[dict[str, Any]] = [
        {
            "name": "hidden",
            "params": hidden,
            "lr_mult": hidden_lr,
            "wd_mult": hidden_wd,
            "eps_mult": hidden_eps,
        },
        {
            "name": "embedding",
            "params": [model.tok_emb.weight, model.pos_emb.weight],
            "lr_mult": 1.0,
            "wd_mult": 0.0,
            "eps_mult": 1.0,
        },
        {"name": "norm", "params": norms, "lr_mult": 1.0, "wd_mult": 0.0, "eps_mult": 1.0},
    ]
    if not model.shape.tie_embeddings:
        groups.append(
            {
                "name": "readout",
                "params": [model.head.weight],
                "lr_mult": 1.0,
                "wd_mult": 1.0,
                "eps_mult": 1.0,
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

        hooks = [model.tok_emb.register_forward_hook(record("embedding"))]
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
