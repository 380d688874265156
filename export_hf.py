"""
A trained model of this project as a Hugging Face BLIP-2 directory, for transformers and the tools built on it:

    python export_hf.py --ckpt=out/stage2/ckpt.pt --out_dir=out/hf/blip2     # Blip2ForConditionalGeneration
    python export_hf.py --ckpt=out/stage1/ckpt.pt --out_dir=out/hf/blip2-itm # Blip2ForImageTextRetrieval

Stage 2 writes the model (ViT, ln_vision as HF's post_layernorm, Q-Former, llm_proj as language_projection, the
LLM as it is), a Blip2Processor (this model's image size and CLIP normalisation; the LLM tokenizer with an <image>
token) and a generation config with the captioning defaults of eval.py (beam 5, 8 to 30 new tokens, length penalty
1; decoder-only LLMs stop at "\\n", as in training). Stage 1 writes the ITC and ITM parts; HF keeps no ITG head
and no temperature. A P-Former run exports the same way: the P-Former only taught the model in training.
Before writing, the export runs one random image through both models and refuses if they disagree.

transformers' Blip2ForConditionalGeneration.generate hands over to its language model, whose own defaults (greedy,
20 tokens, stop at </s>) win over the saved generation config unless it is passed:
model.generate(**inputs, generation_config=model.generation_config).
"""
import copy
import sys

import torch
from transformers import (BlipImageProcessor, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor,
                          GenerationConfig)

from checkpoints import from_checkpoint
from configurator import apply_overrides, config_snapshot
from data import CLIP_MEAN, CLIP_STD
from model import Blip2Stage2
from pretrained import hf_config_of, ours_to_hf, unexportable

# -----------------------------------------------------------------------------
ckpt = ""  # this project's stage-1 or stage-2 checkpoint, e.g. out/stage2/ckpt.pt
out_dir = ""  # the Hugging Face directory to write
model_overrides = {}  # Blip2Config fields to change in the checkpoint's config, e.g. {'llm_model': '/models/opt-2.7b'}
# -----------------------------------------------------------------------------
DEFAULTS = config_snapshot(globals())

IMAGE_TOKEN = "<image>"  # what Blip2Processor puts Q times before the text, for the soft prompt to replace
CAPTION_DEFAULTS = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8, length_penalty=1.0, do_sample=False)


def image_processor(config):
    """A BlipImageProcessor that resizes to this model's image size (bicubic) and normalises as data.py does.
    Loaded with backend="pil" it gives eval.py's pixels exactly; the default torchvision backend resizes a little
    differently."""
    size = config.image_size
    return BlipImageProcessor(size={"height": size, "width": size}, image_mean=list(CLIP_MEAN),
                              image_std=list(CLIP_STD))


def _build(cls, config, state_dict, source):
    """cls (a transformers BLIP-2 class) with exactly these weights: any missing or unexpected one is an error."""
    model, info = cls.from_pretrained(None, config=config, state_dict=state_dict, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            raise ValueError(f"{source}: {kind.replace('_', ' ')} in the Hugging Face model: "
                             f"{sorted(map(str, info[kind]))[:3]}")
    return model.eval()


def probe_image(config):
    """The random image that the export's check runs through both models."""
    size = config.image_size
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def _check_same(ours, theirs, what, source):
    """Refuse an export whose Hugging Face model computes something else than this one (relative 1e-4)."""
    if ours.shape != theirs.shape:
        raise ValueError(f"{source}: the exported model's {what} have shape {tuple(theirs.shape)}, this model's "
                         f"{tuple(ours.shape)}")
    err = (ours - theirs).abs().max().item() / max(ours.abs().max().item(), 1e-6)
    if not err <= 1e-4:  # also catches nan
        raise ValueError(f"{source}: the exported model's {what} differ from this model's (relative error {err:.2g})")


def fresh_tokenizer(tokenizer, padding_side):
    """A copy of a tokenizer without the truncation and padding that earlier calls left in its backend (saved with
    it, a max_length there would truncate every text the processor reads)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.padding_side = padding_side
    return tokenizer


def llm_with_image_token(llm, source):
    """(the LLM's state dict under HF's language_model. names, its config, its tokenizer with <image>, the token's id,
    whether rows were added). <image> takes the first spare embedding row (OPT, FlanT5 and Qwen have padded tables);
    a table with none grows by one zero row, in the input embeddings and in the LM head, and generation suppresses it."""
    # prompts padded on the side FrozenLLM.generate_tokens pads them (decoder-only: the left, next to what follows)
    tokenizer = fresh_tokenizer(llm.tokenizer, llm.prompt_padding_side)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    lm, config = llm.model, copy.deepcopy(llm.model.config)
    rows = lm.get_input_embeddings().num_embeddings
    tables = {lm.get_input_embeddings().weight.data_ptr(), lm.get_output_embeddings().weight.data_ptr()}
    grow = image_token_id + 1 - rows if image_token_id >= rows else 0
    state = {}
    for k, v in lm.state_dict().items():
        if grow and v.data_ptr() in tables and v.shape[0] == rows:
            v = torch.cat([v, v.new_zeros(grow, *v.shape[1:])])
        elif grow and k.endswith("final_logits_bias"):  # an LM head bias of V entries, e.g. Marian's
            raise ValueError(f"{source}: the LLM has no spare row for {IMAGE_TOKEN} and an LM head bias")
        state["language_model." + k] = v
    if grow:
        config.vocab_size = rows + grow
    return state, config, tokenizer, image_token_id, bool(grow)


def export_stage2(model, out, source):
    llm = model.llm
    llm_state, text_config, tokenizer, image_token_id, grown = llm_with_image_token(llm, source)
    config = hf_config_of(model, text_config, image_token_index=image_token_id)
    with torch.device("meta"):
        keys = Blip2ForConditionalGeneration(config).state_dict().keys()
    state = {**ours_to_hf(model.state_dict(), keys, source, left_behind=("pformer.",)), **llm_state}
    hf = _build(Blip2ForConditionalGeneration, config, state, source)
    image = probe_image(model.config)
    _check_same(model.soft_prompt(image), hf.get_image_features(image).pooler_output, "soft prompts", source)
    generation = GenerationConfig.from_model_config(text_config)
    generation.update(**CAPTION_DEFAULTS, eos_token_id=llm.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      suppress_tokens=[image_token_id] if grown else None)
    hf.generation_config = generation
    hf.save_pretrained(out)
    Blip2Processor(image_processor(model.config), tokenizer, num_query_tokens=model.config.num_query_tokens
                   ).save_pretrained(out)
    return hf


def export_stage1(model, out, source):
    wanted = {"itc", "itm"} - set(model.config.stage1_losses)
    if wanted:
        raise ValueError(f"{source}: stage 1 was trained without {' and '.join(sorted(wanted))} "
                         f"(stage1_losses={model.config.stage1_losses}), whose heads Blip2ForImageTextRetrieval needs")
    config = hf_config_of(model)
    with torch.device("meta"):
        keys = Blip2ForImageTextRetrieval(config).state_dict().keys()
    # HF keeps no ITG head and no temperature; llm_proj and the P-Former were for a P-Former run's stage 2
    state = ours_to_hf(model.state_dict(), keys, source, left_behind=("itg_head.", "temp", "llm_proj.", "pformer."))
    hf = _build(Blip2ForImageTextRetrieval, config, state, source)
    image, (ids, mask) = probe_image(model.config), model.tokenize(["a photo of two things"], "cpu")
    embeds = model.image_embeds(image)[0]
    itc = model.similarity(model.image_feats(model.qformer.encode_queries(embeds)[0]), model.text_feats(ids, mask))
    _check_same(itc, hf(pixel_values=image, input_ids=ids, attention_mask=mask).logits_per_image, "ITC scores",
                source)
    _check_same(model.itm_logits(embeds, ids, mask), hf(pixel_values=image, input_ids=ids, attention_mask=mask,
                                                        use_image_text_matching_head=True).logits_per_image,
                "ITM logits", source)
    hf.save_pretrained(out)
    Blip2Processor(image_processor(model.config), fresh_tokenizer(model.tokenizer, "right")).save_pretrained(out)
    # Blip2Processor adds <image> to its tokenizer (again on every load); the retrieval model never reads it, and the
    # tokenizer on disk stays the Q-Former's vocabulary, which pretrained.py checks against the word embeddings
    fresh_tokenizer(model.tokenizer, "right").save_pretrained(out)
    return hf


@torch.no_grad()
def export(model, out, source="model"):
    """Write a Blip2Stage1 / Blip2Stage2 (in eval mode, float32) as a Hugging Face BLIP-2 directory `out`.
    Returns the transformers model that was written."""
    why = unexportable(model)
    if why:
        raise ValueError(f"{source} cannot be exported to Hugging Face's BLIP-2: {why}")
    half = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if half:
        raise ValueError(f"{source} has {', '.join(half)} weights: export a float32 model (from_checkpoint on CPU "
                         f"gives one); transformers casts at loading (from_pretrained(..., dtype=torch.float16))")
    model.eval()
    return (export_stage2 if isinstance(model, Blip2Stage2) else export_stage1)(model, out, source)


def main(cfg):
    if not cfg["ckpt"] or not cfg["out_dir"]:
        raise ValueError("give the checkpoint and the directory to write: --ckpt=out/stage2/ckpt.pt --out_dir=out/hf")
    model = from_checkpoint(cfg["ckpt"], "cpu", cfg["model_overrides"])
    hf = export(model, cfg["out_dir"], cfg["ckpt"])
    print(f"{cfg['ckpt']} -> {cfg['out_dir']} ({type(hf).__name__})")
    block_eps = model.visual.vit.blocks[0].norm1.eps
    if model.ln_vision.eps != block_eps:
        print(f"note: ln_vision's LayerNorm eps {model.ln_vision.eps:g} is {block_eps:g} there (one eps for the "
              f"whole vision model); the export's check found the soft prompt / features the same to 1e-4")
    if isinstance(model, Blip2Stage2) and model.config.prompt:
        print(f"trained with the text prompt {model.config.prompt!r}: give it to the processor as text=")


if __name__ == "__main__":
    main(apply_overrides(dict(DEFAULTS), sys.argv[1:]))
