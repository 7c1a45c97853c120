"""`scalelab export RUN_DIR --format hf --out DIR`: a run as a Hugging Face model directory.

Writes `config.json` (`GPT2Config` / `LlamaConfig` — `Qwen3Config` for a llama with QK-norm, Qwen3's
attention — from `models.hf.hf_config`: the config the `hf:gpt2` / `hf:llama` families build), `model.safetensors` and the tokenizer files
(`tokenizer.json`, `tokenizer_config.json`), loadable with `AutoModelForCausalLM.from_pretrained(DIR)`
and `AutoTokenizer.from_pretrained(DIR)`. The weights come from the run's newest verified checkpoint
through `serve.loading.load_run`. The exported model is a plain one: the parametrization's multipliers
are folded into the weights (all exact, the layers are bias-free and linear where it matters):
  * readout multiplier α (μP): the readout weight × α — a tied readout with α ≠ 1 is exported untied;
  * attention scale s (μP's 1/d_head) where HF uses 1/sqrt(d_head): the query weights × s·sqrt(d_head)
    (with QK-norm, the query norm's weight, which comes after the query projection);
  * residual-branch multiplier m (depth-μP): the branch's output projection × m.
Needs the `hf` extra (transformers) for the config classes and the tokenizer wrapper.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from scalelab.data.tokenize import EOD_TOKEN, ByteTokenizer, Tokenizer
from scalelab.errors import ScalelabError
from scalelab.models.hf import hf_config
from scalelab.serve.loading import load_run

FORMATS = ("hf",)


def _q_scale(attn: Any) -> float:
    """Factor folding the model's attention scale into the queries, for HF's 1/sqrt(d_head)."""
    return 1.0 if attn.scale is None else attn.scale * math.sqrt(attn.d_head)


def _add_readout(model: Any, out: dict[str, torch.Tensor]) -> bool:
    """Add `lm_head.weight` (α folded in) unless the readout stays tied to the embedding; tied?"""
    tied = model.head.weight is model.embedding.weight and model.output_multiplier == 1.0
    if not tied:
        out["lm_head.weight"] = model.head.weight * model.output_multiplier
    return bool(tied)


def _gpt2(model: Any, eod_id: int) -> tuple[Any, dict[str, torch.Tensor]]:
    s, d = model.shape, model.shape.width
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": model.tok_emb.weight,
        "transformer.wpe.weight": model.pos_emb.weight,
        "transformer.ln_f.weight": model.ln_f.weight,
        "transformer.ln_f.bias": torch.zeros(d),
    }
    for i, block in enumerate(model.blocks):
        m, pre = block.residual_multiplier, f"transformer.h.{i}."
        qkv = block.attn.qkv.weight.clone()
        qkv[:d] *= _q_scale(block.attn)
        hidden = block.mlp.fc.weight.shape[0]
        out |= {  # HF's Conv1D stores (in, out): transposed
            pre + "ln_1.weight": block.ln1.weight,
            pre + "ln_1.bias": torch.zeros(d),
            pre + "attn.c_attn.weight": qkv.T,
            pre + "attn.c_attn.bias": torch.zeros(3 * d),
            pre + "attn.c_proj.weight": (block.attn.proj.weight * m).T,
            pre + "attn.c_proj.bias": torch.zeros(d),
            pre + "ln_2.weight": block.ln2.weight,
            pre + "ln_2.bias": torch.zeros(d),
            pre + "mlp.c_fc.weight": block.mlp.fc.weight.T,
            pre + "mlp.c_fc.bias": torch.zeros(hidden),
            pre + "mlp.c_proj.weight": (block.mlp.proj.weight * m).T,
            pre + "mlp.c_proj.bias": torch.zeros(d),
        }
    tied = _add_readout(model, out)
    config = hf_config(
        replace(s, family="hf:gpt2", tie_embeddings=tied),
        activation_function="gelu",  # exact (erf) GELU, as models/gpt.py
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=model.ln_f.eps,
        bos_token_id=eod_id,
        eos_token_id=eod_id,
    )
    return config, out


def _llama(model: Any, eod_id: int) -> tuple[Any, dict[str, torch.Tensor]]:
    from scalelab.models.llama import NORM_EPS, ROPE_THETA

    s = model.shape
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.tok_emb.weight,
        "model.norm.weight": model.norm.weight,
    }
    for i, block in enumerate(model.blocks):
        m, pre, attn, mlp = block.residual_multiplier, f"model.layers.{i}.", block.attn, block.mlp
        q_scale = _q_scale(attn)
        if s.qk_norm:  # queries are normalized after q_proj: the scale goes into q_norm's weight
            out |= {
                pre + "self_attn.q_norm.weight": attn.q_norm.weight * q_scale,
                pre + "self_attn.k_norm.weight": attn.k_norm.weight,
            }
            q_scale = 1.0
        out |= {
            pre + "input_layernorm.weight": block.attn_norm.weight,
            pre + "self_attn.q_proj.weight": attn.wq.weight * q_scale,
            pre + "self_attn.k_proj.weight": attn.wk.weight,
            pre + "self_attn.v_proj.weight": attn.wv.weight,
            pre + "self_attn.o_proj.weight": attn.wo.weight * m,
            pre + "post_attention_layernorm.weight": block.mlp_norm.weight,
            pre + "mlp.gate_proj.weight": mlp.w1.weight,
            pre + "mlp.up_proj.weight": mlp.w3.weight,
            pre + "mlp.down_proj.weight": mlp.w2.weight * m,
        }
    tied = _add_readout(model, out)
    # QK-norm (RMSNorm per head on q and k, before RoPE) is Qwen3's attention; otherwise plain Llama
    extra = {"use_sliding_window": False} if s.qk_norm else {"mlp_bias": False}
    config = hf_config(
        replace(s, family="hf:qwen3" if s.qk_norm else "hf:llama", tie_embeddings=tied),
        head_dim=s.d_head,
        rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        hidden_act="silu",
        attention_bias=False,
        bos_token_id=eod_id,
        eos_token_id=eod_id,
        **extra,
    )
    return config, out


EXPORTERS = {"gpt2": _gpt2, "llama": _llama}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table, the alphabet of HF's byte-level pre-tokenizer."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def hf_tokenizer(tok: Tokenizer) -> Any:
    """The run's tokenizer as a `tokenizers.Tokenizer`: BPE as it is; bytes as a merge-free byte-level
    BPE whose ids are the byte values, with EOD (256) as a special token — the same ids either way."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    if not isinstance(tok, ByteTokenizer):
        return HFTokenizer.from_str(tok.to_str())  # type: ignore[attr-defined]
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOD_TOKEN])
    return hf


def export_hf(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the run's newest verified checkpoint as a Hugging Face model directory; returns `out_dir`."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise ScalelabError("export --format hf needs transformers: pip install 'scalelab[hf]'") from None
    run = load_run(run_dir)
    family = run.spec.model.family
    if family not in EXPORTERS:
        raise ScalelabError(
            f"{run_dir}: model.family {family!r} has no Hugging Face export (built-in: {', '.join(EXPORTERS)})"
        )
    with torch.no_grad():
        config, tensors = EXPORTERS[family](run.model, run.tokenizer.eod_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    weights = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizer(run.tokenizer), eos_token=EOD_TOKEN, bos_token=EOD_TOKEN
    ).save_pretrained(out)
    return out
