"""
Weights from outside this project, mapped onto model.py's modules by explicit key tables:
  - bert-base-uncased into the Q-Former (and its ITG head) and into the P-Former: BLIP-2 section 3.1 initialises the
    Q-Former from BERT-base, its cross-attention layers at random; the P-Former paper starts its encoder from BERT too;
  - official BLIP-2 checkpoints in Hugging Face format: Blip2ForConditionalGeneration (e.g. Salesforce/blip2-opt-2.7b)
    as a Blip2Stage2, Blip2ForImageTextRetrieval (e.g. Salesforce/blip2-itm-vit-g) as a Blip2Stage1. The vision tower
    becomes a timm EVA ViT, the Q-Former this project's own; tests/test_model.py checks that both compute what
    transformers computes.
Every load goes through backbones.load_weights: a missing, unexpected or misshapen key is an error naming it.
And the way back, for export_hf.py: ours_to_hf reads the same key table in reverse, hf_config_of mirrors
_config_from_hf, and unexportable says what Hugging Face's BLIP-2 cannot hold.
"""
import re

import torch
import torch.nn as nn

from backbones import DTYPES, from_pretrained, from_pretrained_checked, load_weights, wrap_llm
from model import BertBridge, Blip2Config, Blip2Stage1, Blip2Stage2, load_qformer_tokenizer

# -----------------------------------------------------------------------------
# bert-base-uncased -> Q-Former, P-Former


def bert_state_dict(src):
    """A BERT state dict, keys without the "bert." prefix, from a HF BertModel / BertForMaskedLM object or a
    name or directory (read with BertForMaskedLM so that BERT's MLM head comes along when present)."""
    if isinstance(src, str):
        from transformers import BertForMaskedLM

        src = from_pretrained_checked(BertForMaskedLM, src, "BERT")
    return {k.removeprefix("bert."): v for k, v in src.state_dict().items()}, getattr(src, "name_or_path", "BERT")


_BERT_LAYER_MAP = [  # (bert key, our keys); BERT's FFN also initialises the query FFN
    ("attention.self.query", ["self_attn.query"]), ("attention.self.key", ["self_attn.key"]),
    ("attention.self.value", ["self_attn.value"]), ("attention.output.dense", ["self_attn.out"]),
    ("attention.output.LayerNorm", ["self_attn.norm"]), ("intermediate.dense", ["ffn_text.fc1", "ffn_query.fc1"]),
    ("output.dense", ["ffn_text.fc2", "ffn_query.fc2"]), ("output.LayerNorm", ["ffn_text.norm", "ffn_query.norm"]),
]


def bert_to_qformer(sd, qformer, prefix="qformer."):
    """Map a BERT state dict onto a Q-Former's parameter names (with `prefix`). The word embeddings keep their
    extra rows ([DEC]) from the random init; token-type embedding 0 is folded into the position embeddings, so that
    the text path computes exactly BERT's function (BERT adds it to every token; the official code drops it)."""
    words = qformer.word_embeddings.weight.detach().clone()
    n = sd["embeddings.word_embeddings.weight"].shape[0]
    if n > words.shape[0]:
        raise ValueError(f"BERT has {n} word embeddings, the Q-Former only {words.shape[0]}")
    words[:n] = sd["embeddings.word_embeddings.weight"]
    pos = sd["embeddings.position_embeddings.weight"]
    if "embeddings.token_type_embeddings.weight" in sd:
        pos = pos + sd["embeddings.token_type_embeddings.weight"][0]
    out = {prefix + "word_embeddings.weight": words, prefix + "position_embeddings.weight": pos,
           prefix + "embed_norm.weight": sd["embeddings.LayerNorm.weight"],
           prefix + "embed_norm.bias": sd["embeddings.LayerNorm.bias"]}
    return {**out, **_bert_layers(sd, len(qformer.layers), prefix, qformer.config.num_query_tokens > 0)}


def _bert_layers(sd, n_layers, prefix, with_queries):
    out = {}
    for i in range(n_layers):
        for theirs, ours in _BERT_LAYER_MAP:
            for our in ours:
                if our.startswith("ffn_query") and not with_queries:
                    continue
                for p in ("weight", "bias"):
                    key = f"encoder.layer.{i}.{theirs}.{p}"
                    if key not in sd:
                        raise ValueError(f"BERT checkpoint has no '{key}' (the model has {n_layers} layers)")
                    out[f"{prefix}layers.{i}.{our}.{p}"] = sd[key]
    return out


def bert_to_bridge(sd, n_layers, n_positions):
    """A BERT state dict under model.BertBridge's names: the whole encoder, and of the embedding block the first
    n_positions position embeddings (token type 0 folded in, as BERT adds it everywhere) and the LayerNorm."""
    pos = sd["embeddings.position_embeddings.weight"][:n_positions] + sd["embeddings.token_type_embeddings.weight"][0]
    return {"position_embeddings.weight": pos, "embed_norm.weight": sd["embeddings.LayerNorm.weight"],
            "embed_norm.bias": sd["embeddings.LayerNorm.bias"], **_bert_layers(sd, n_layers, "", False)}


def init_from_bert(model, bert):
    """Initialise a Blip2Stage1's Q-Former and ITG head (BERT's MLM head, when the checkpoint has it; the bias of
    [DEC] stays 0), or a PFormer's encoder, from bert-base-uncased-format weights (a name, directory or object)."""
    if isinstance(getattr(model, "qformer", None), BertBridge):
        return model  # built from BERT already
    sd, source = bert_state_dict(bert)
    encoder = model.qformer if hasattr(model, "qformer") else model.encoder
    mapping = bert_to_qformer(sd, encoder, prefix="qformer." if hasattr(model, "qformer") else "encoder.")
    if hasattr(model, "itg_head") and "cls.predictions.transform.dense.weight" in sd:
        for ours, theirs in (("dense", "transform.dense"), ("norm", "transform.LayerNorm")):
            for p in ("weight", "bias"):
                mapping[f"itg_head.{ours}.{p}"] = sd[f"cls.predictions.{theirs}.{p}"]
        bias = model.itg_head.bias.detach().clone()
        bias[: sd["cls.predictions.bias"].shape[0]] = sd["cls.predictions.bias"]
        mapping["itg_head.bias"] = bias
    load_weights(model, mapping, f"BERT weights from {source}", required=())
    return model


# -----------------------------------------------------------------------------
# Hugging Face BLIP-2 -> Blip2Stage1 / Blip2Stage2

# regexes on the HF key; vision keys land on the timm EVA ViT
_HF_KEY_MAP = [
    (r"vision_model\.embeddings\.class_embedding", "visual.vit.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "visual.vit.pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.", "visual.vit.patch_embed.proj."),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual.vit.blocks.\1.norm\2."),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual.vit.blocks.\1.attn.proj."),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.", r"visual.vit.blocks.\1.attn."),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual.vit.blocks.\1.mlp."),
    (r"vision_model\.post_layernorm\.", "ln_vision."),
    (r"query_tokens", "qformer.query_tokens"),
    (r"qformer\.layernorm\.", "qformer.embed_norm."),
    (r"embeddings\.(word|position)_embeddings\.", r"qformer.\1_embeddings."),
    (r"qformer\.encoder\.layer\.(\d+)\.attention\.attention\.", r"qformer.layers.\1.self_attn."),
    (r"qformer\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"qformer.layers.\1.self_attn.out."),
    (r"qformer\.encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"qformer.layers.\1.self_attn.norm."),
    (r"qformer\.encoder\.layer\.(\d+)\.crossattention\.attention\.", r"qformer.layers.\1.cross_attn."),
    (r"qformer\.encoder\.layer\.(\d+)\.crossattention\.output\.dense\.", r"qformer.layers.\1.cross_attn.out."),
    (r"qformer\.encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.", r"qformer.layers.\1.cross_attn.norm."),
    (r"qformer\.encoder\.layer\.(\d+)\.intermediate_query\.dense\.", r"qformer.layers.\1.ffn_query.fc1."),
    (r"qformer\.encoder\.layer\.(\d+)\.output_query\.dense\.", r"qformer.layers.\1.ffn_query.fc2."),
    (r"qformer\.encoder\.layer\.(\d+)\.output_query\.LayerNorm\.", r"qformer.layers.\1.ffn_query.norm."),
    (r"qformer\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"qformer.layers.\1.ffn_text.fc1."),
    (r"qformer\.encoder\.layer\.(\d+)\.output\.dense\.", r"qformer.layers.\1.ffn_text.fc2."),
    (r"qformer\.encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"qformer.layers.\1.ffn_text.norm."),
    (r"language_projection\.", "llm_proj."),
    (r"vision_projection\.", "vision_proj."),
    (r"text_projection\.", "text_proj."),
    (r"itm_head\.", "itm_head."),
]


_HF_QKV_BIAS = r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias"


def _our_key(hf_key):
    """This project's name for a Hugging Face BLIP-2 key (not the language model's, not the qkv bias), or None."""
    for pattern, repl in _HF_KEY_MAP:
        if re.match(pattern, hf_key):
            return re.sub(pattern, repl, hf_key, count=1)
    return None


def hf_to_ours(hf_state_dict, source):
    """A Hugging Face BLIP-2 state dict (minus the language model) under this project's names."""
    mapping = {}
    for key, value in hf_state_dict.items():
        if key.startswith("language_model."):
            continue
        qkv_bias = re.fullmatch(_HF_QKV_BIAS, key)
        if qkv_bias:  # HF keeps one bias cat(q_bias, 0, v_bias); EVA has q_bias and v_bias and no key bias
            q, k, v = value.chunk(3)
            if k.abs().max() > 0:
                raise ValueError(f"{key}: the key part of this bias is not zero, but EVA's attention has no key bias")
            block = f"visual.vit.blocks.{qkv_bias.group(1)}.attn."
            mapping[block + "q_bias"], mapping[block + "v_bias"] = q, v
            continue
        ours = _our_key(key)
        if ours is None:
            raise ValueError(f"{source}: checkpoint key with no place in this model: {key}")
        mapping[ours] = value
    return mapping


def _config_from_hf(hf_config, **overrides):
    """A Blip2Config with the sizes of a Hugging Face Blip2Config. The vision tower becomes a timm EVA ViT of
    the same shape (the HF vision config already counts only the kept blocks)."""
    v, q = hf_config.vision_config, hf_config.qformer_config
    if v.hidden_act != "gelu" or not v.qkv_bias:
        raise ValueError("only EVA-style vision towers (exact GELU, q/v bias) can be loaded")
    # timm builds int(width * mlp_ratio) hidden units: the half unit keeps float rounding from losing one
    # (44 wide with an MLP of 98: 98 / 44 * 44 = 97.99..., int() gives 97)
    mlp_ratio = (v.intermediate_size + 0.5) / v.hidden_size
    return Blip2Config(
        vit_model="eva_giant_patch14_clip_224", vit_layers=v.num_hidden_layers, vit_pretrained="",
        vit_kwargs=dict(patch_size=v.patch_size, embed_dim=v.hidden_size, depth=v.num_hidden_layers,
                        num_heads=v.num_attention_heads, mlp_ratio=mlp_ratio,
                        **({} if v.layer_norm_eps == 1e-6 else dict(norm_layer=_layer_norm(v.layer_norm_eps)))),
        image_size=v.image_size, ln_vision_eps=v.layer_norm_eps,
        num_query_tokens=hf_config.num_query_tokens, cross_attention_freq=q.cross_attention_frequency,
        hidden_size=q.hidden_size, num_layers=q.num_hidden_layers, num_heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size, vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
        dropout=q.hidden_dropout_prob, embed_dim=getattr(hf_config, "image_text_hidden_size", 256), **overrides)


def _layer_norm(eps):
    import functools

    return functools.partial(nn.LayerNorm, eps=eps)


def _load_hf_blip2(src, cls_name, dtype):
    import transformers

    cls = getattr(transformers, cls_name)
    if isinstance(src, str):
        return from_pretrained_checked(cls, src, f"{cls_name} checkpoint", dtype=DTYPES[dtype]), src
    if not isinstance(src, cls):
        raise TypeError(f"expected a {cls_name} or a directory, got {type(src).__name__}")
    return src, getattr(src, "name_or_path", cls_name) or cls_name


def _load_from_hf(model, hf_model, source):
    """Everything but the LLM (reused as is) and what HF does not keep (ITG head, temperature) must be there."""
    required = {k for k, p in model.named_parameters()
                if not k.startswith(("llm.", "itg_head.")) and k not in ("temp", "frame_embed")}
    load_weights(model, hf_to_ours(hf_model.state_dict(), source), source, required=required)
    return model


def blip2_stage2_from_hf(src, tokenizer=None, dtype="float32", **config_overrides):
    """An official BLIP-2 in Hugging Face format (Blip2ForConditionalGeneration: a Hub name such as
    Salesforce/blip2-opt-2.7b, a directory, or the in-memory model) as a Blip2Stage2, its frozen weights in `dtype`.
    The HF language model module is reused (cast to `dtype`); `tokenizer` defaults to the one saved with the
    checkpoint."""
    hf, source = _load_hf_blip2(src, "Blip2ForConditionalGeneration", dtype)
    if tokenizer is None:
        from transformers import AutoTokenizer

        if not isinstance(src, str):
            raise ValueError("pass the LLM tokenizer along with an in-memory Blip2ForConditionalGeneration")
        tokenizer = from_pretrained(AutoTokenizer, src, "tokenizer")
    config = _config_from_hf(hf.config, vit_dtype=dtype, llm_dtype=dtype, llm_model=source, **config_overrides)
    # the LLM module is reused, in the frozen weights' dtype (an in-memory model may come in another)
    llm = wrap_llm(hf.language_model.to(DTYPES[dtype]), tokenizer, **config.llm_options())
    return _load_from_hf(Blip2Stage2(config, llm=llm), hf, source)


def blip2_stage1_from_hf(src, tokenizer=None, dtype="float32", **config_overrides):
    """An official BLIP-2 Q-Former checkpoint in Hugging Face format (Blip2ForImageTextRetrieval: a Hub name such as
    Salesforce/blip2-itm-vit-g, a directory, or the in-memory model) as a Blip2Stage1. HF keeps no ITG head and no
    temperature: those keep their fresh initialisation."""
    hf, source = _load_hf_blip2(src, "Blip2ForImageTextRetrieval", dtype)
    if tokenizer is None:
        if not isinstance(src, str):
            raise ValueError("pass the BERT tokenizer along with an in-memory Blip2ForImageTextRetrieval")
        tokenizer = src
    config = _config_from_hf(hf.config, vit_dtype=dtype, bert=source, **config_overrides)
    return _load_from_hf(Blip2Stage1(config, tokenizer=load_qformer_tokenizer(tokenizer)), hf, source)


def blip2_language_projection(src):
    """{"weight", "bias"} of the language projection (llm_proj) of an official BLIP-2 in Hugging Face format (a Hub
    name such as Salesforce/blip2-opt-2.7b, or a directory), read alone from its safetensors files: the official video
    runs start their opt_proj from BLIP-2's pretrained OPT-2.7b checkpoint."""
    import json
    import os

    from safetensors import safe_open

    def local(name):
        if os.path.isdir(src):
            return os.path.join(src, name)
        from huggingface_hub import hf_hub_download

        return hf_hub_download(src, name)

    try:
        try:
            with open(local("model.safetensors.index.json")) as f:
                files = json.load(f)["weight_map"]
        except (OSError, ValueError):  # one file, no index
            files = {}
        out = {}
        for p in ("weight", "bias"):
            key = f"language_projection.{p}"
            with safe_open(local(files.get(key, "model.safetensors")), framework="pt") as f:
                if key not in f.keys():
                    raise ValueError(f"no {key} in it")
                out[p] = f.get_tensor(key).float()
        return out
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read llm_proj from the BLIP-2 checkpoint '{src}': {str(e).splitlines()[0][:200]}") \
            from None


def init_llm_proj_from_blip2(model, src):
    """model.llm_proj <- the official BLIP-2 `src`'s language projection; the shapes must agree."""
    weights = {f"llm_proj.{k}": v for k, v in blip2_language_projection(src).items()}
    load_weights(model, weights, f"the language projection of {src}", required=())
    return model


# -----------------------------------------------------------------------------
# Blip2Stage1 / Blip2Stage2 -> Hugging Face BLIP-2 (export_hf.py writes the directory)


def unexportable(model):
    """Why a Blip2Stage1 / Blip2Stage2 cannot be written as a Hugging Face BLIP-2, or None. HF's BLIP-2 reads one
    image through an EVA-style ViT (pre-LN blocks, exact GELU, q/v bias, no pre-norm, no rotary embedding)."""
    c = model.config
    if c.feature_dim:
        return (f"this model reads pre-extracted clip features (feature_dim={c.feature_dim}); Hugging Face's BLIP-2 "
                f"reads images only")
    if c.num_frames > 1:
        return (f"this is a clip model (num_frames={c.num_frames}): its learned frame embedding has no place in "
                f"Hugging Face's BLIP-2, which reads one image")
    if isinstance(model, Blip2Stage2) and c.llm_prompt_prefix:
        return (f"its soft prompt follows llm_prompt_prefix={c.llm_prompt_prefix!r}; Hugging Face's BLIP-2 starts "
                f"the LLM's input with the image tokens")
    if isinstance(model, Blip2Stage2) and c.llm_prompt_suffix:
        return (f"its soft prompt ends with llm_prompt_suffix={c.llm_prompt_suffix!r}, before BOS; Hugging Face's "
                f"BLIP-2 puts BOS right after the image tokens")
    vit = model.visual.vit
    eva_like = (type(vit).__name__ == "Eva" and vit.rope is None and isinstance(vit.norm_pre, nn.Identity)
                and vit.num_prefix_tokens == 1 and all(isinstance(b.mlp.act, nn.GELU) and b.mlp.act.approximate == "none"
                                                       for b in vit.blocks if hasattr(b.mlp, "act")))
    if not eva_like:
        return (f"the image encoder '{c.vit_model}' ({type(vit).__name__}) is not EVA-style (pre-LN blocks, exact "
                f"GELU, q/v bias, no pre-norm, no rotary embedding), the only one Hugging Face's BLIP-2 vision model "
                f"computes")
    return None


def hf_config_of(model, text_config=None, image_token_index=None):
    """The Hugging Face Blip2Config of a Blip2Stage1 (text_config None) or Blip2Stage2 (text_config: its LLM's):
    the mirror of _config_from_hf. HF's vision config has one LayerNorm eps for the blocks and ln_vision; the
    blocks' is kept."""
    from transformers import Blip2Config as HFBlip2Config, Blip2QFormerConfig, Blip2VisionConfig

    c, vit = model.config, model.visual.vit
    block = vit.blocks[0]
    vision = Blip2VisionConfig(hidden_size=model.visual.width, intermediate_size=block.mlp.fc1.out_features,
                               num_hidden_layers=len(vit.blocks), num_attention_heads=block.attn.num_heads,
                               image_size=c.image_size, patch_size=vit.patch_embed.patch_size[0],
                               layer_norm_eps=block.norm1.eps, qkv_bias=True, hidden_act="gelu")
    qformer = Blip2QFormerConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                                 intermediate_size=c.intermediate_size, cross_attention_frequency=c.cross_attention_freq,
                                 encoder_hidden_size=model.visual.width, vocab_size=c.vocab_size,
                                 max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps,
                                 hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout,
                                 use_qformer_text_input=text_config is None)
    return HFBlip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=None if text_config is None else text_config.to_dict(),
                         num_query_tokens=c.num_query_tokens, image_token_index=image_token_index,
                         image_text_hidden_size=c.embed_dim)


def ours_to_hf(state_dict, hf_keys, source, left_behind=()):
    """The reverse of hf_to_ours, with its own table: this project's weights (minus the LLM) under the names
    `hf_keys` of a Hugging Face BLIP-2 (the language model's are skipped). Every HF key must find its weight, and
    every weight of ours a key, but those starting with one of `left_behind` (what HF keeps no place for)."""
    out, used = {}, set()
    for key in hf_keys:
        if key.startswith("language_model."):
            continue
        qkv_bias = re.fullmatch(_HF_QKV_BIAS, key)
        if qkv_bias:  # EVA's q_bias and v_bias -> HF's cat(q_bias, 0, v_bias)
            block = f"visual.vit.blocks.{qkv_bias.group(1)}.attn."
            q, v = state_dict[block + "q_bias"], state_dict[block + "v_bias"]
            out[key] = torch.cat([q, torch.zeros_like(q), v])
            used.update((block + "q_bias", block + "v_bias"))
            continue
        ours = _our_key(key)
        if ours not in state_dict:
            raise ValueError(f"{source}: no weight of this model for Hugging Face's {key} (expected {ours})")
        out[key] = state_dict[ours]
        used.add(ours)
    extra = sorted(k for k in state_dict if k not in used and not k.startswith(("llm.", *left_behind)))
    if extra:
        raise ValueError(f"{source}: {extra[0]}{f' and {len(extra) - 1} more' if len(extra) > 1 else ''} has no "
                         f"place in Hugging Face's BLIP-2")
    return out
