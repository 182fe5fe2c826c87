"""LoRA (peft) on any of the three sub-models, for domain adaptation with few trainable parameters.

peft has no default targets for DPR/BERT-style encoders, so targets are chosen per architecture here
(BERT-like: ``query``/``value``; Llama/Mistral/Qwen: ``q_proj``/``v_proj``; BART: ``q_proj``/``v_proj``;
T5: ``q``/``v``; GPT-2: ``c_attn``) unless ``model.lora_target_modules`` names them.  Export merges the
adapters into the base weights (plain transformers can reload them) and also writes the adapters alone.
"""

from __future__ import annotations

from torch import nn

DEFAULT_TARGETS = {
    "bert": ["query", "value"], "dpr": ["query", "value"], "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"], "electra": ["query", "value"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "bart": ["q_proj", "v_proj"], "t5": ["q", "v"], "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}


def lora_targets(model: nn.Module, override: list[str] | None = None) -> list[str]:
    if override:
        return list(override)
    mtype = getattr(model.config, "model_type", "")
    if mtype not in DEFAULT_TARGETS:
        raise ValueError(f"no default LoRA target modules for model_type {mtype!r}; "
                         "set model.lora_target_modules")
    return DEFAULT_TARGETS[mtype]


def apply_lora(model: nn.Module, *, r: int = 8, alpha: int = 16, dropout: float = 0.05,
               target_modules: list[str] | None = None) -> nn.Module:
    """Wrap a Hugging Face model with LoRA adapters; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_targets(model, target_modules),
                     bias="none")
    return get_peft_model(model, cfg)


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain transformers model with the adapters merged in (the live model is left untouched)."""
    import copy

    return copy.deepcopy(model).merge_and_unload()
