"""export_hf.py: models of this project written as Hugging Face BLIP-2 directories compute, in transformers, what
they compute here (logits, generated tokens, ITC and ITM scores), load back through pretrained.py unchanged, and
models that the format cannot hold are refused."""

import json
import os

import pytest
import torch
from PIL import Image
from transformers import (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor, LlamaConfig,
                          LlamaForCausalLM)

import export_hf
import tiny
from backbones import FrozenLLM, wrap_llm
from model import Blip2Stage1, Blip2Stage2
from pretrained import blip2_stage1_from_hf, blip2_stage2_from_hf
from scripts import run_script, train_tiny
from tiny import close
from world import byte_tokenizer

CAPTIONS = ["a red square", "two blue stars"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny.bert_dir(str(tmp_path_factory.mktemp("bert")))


def images(n=2, seed=0):
    return torch.randn(n, 3, tiny.IMAGE, tiny.IMAGE, generator=torch.Generator().manual_seed(seed))


def tiny_llm(text):
    """(a tiny random LLM, its tokenizer). OPT, BLOOM and T5 have a spare embedding row, as OPT-2.7b and FlanT5 do; the
    Llama has none (as SmolLM2), so the export adds one for <image>."""
    if text != "llama":
        hf, tok = tiny.hf_blip2(text)
        return hf.language_model, tok
    torch.manual_seed(0)
    tok = byte_tokenizer()
    return LlamaForCausalLM(LlamaConfig(hidden_size=tiny.HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                        max_position_embeddings=128, initializer_range=tiny.INIT_STD,
                                        pad_token_id=1, bos_token_id=2, eos_token_id=2)), tok


def close_logits(a, b):
    """To 1e-5 of the largest logit: the two models run the same weights through different attention kernels, and
    the random T5's logits reach ~40, where float32 rounding alone is a few 1e-6."""
    close(a, b, tol=1e-5 * max(1.0, b.abs().max().item()))


def processor_inputs(processor, texts):
    """input_ids and attention_mask as Blip2Processor makes them for these texts (one image each)."""
    blank = [Image.new("RGB", (tiny.IMAGE, tiny.IMAGE))] * len(texts)
    out = processor(images=blank, text=texts, padding="longest", return_tensors="pt")
    return out.input_ids, out.attention_mask


@pytest.mark.parametrize("text", ["opt", "llama", "bloom", "t5"])
def test_stage2_export_computes_what_this_code_computes(bert, tmp_path, text):
    lm, tok = tiny_llm(text)
    prompt = "a photo of" if text == "t5" else ""
    config = tiny.our_config(bert, ln_vision_eps=1e-6)  # HF's vision config has one eps: the ViT blocks'
    ours = tiny.perturb(Blip2Stage2(config, llm=wrap_llm(lm, tok, prompt=prompt)), seed=1)
    img = images()
    soft = ours.soft_prompt(img)
    inputs = ours.llm.inputs(soft, CAPTIONS)  # before the export: the tokenizer keeps this call's truncation
    export_hf.export(ours, str(tmp_path))
    hf, info = Blip2ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    processor = Blip2Processor.from_pretrained(tmp_path)
    V = len(tok) if text == "llama" else lm.config.vocab_size
    # logits of the LM loss's input: soft prompt + text, here as in transformers with the processor's token ids
    if text == "t5":
        ids, mask = processor_inputs(processor, [prompt] * 2)
        labels = inputs["labels"]
        ref = hf(pixel_values=img, input_ids=ids, attention_mask=mask, labels=labels,
                 decoder_attention_mask=inputs["decoder_attention_mask"])
        out = ours.llm.model(**inputs)
        close_logits(out.logits, ref.logits[..., :V])
        close(out.loss, ref.loss)
    else:
        ids, mask = processor_inputs(processor, [c + "\n" for c in CAPTIONS])
        inputs.pop("labels")
        close_logits(ours.llm.model(**inputs).logits, hf(pixel_values=img, input_ids=ids, attention_mask=mask).logits[..., :V])
    # greedy and beam search, and the exported generation config: eval.py's captioning defaults
    ids, mask = processor_inputs(processor, [prompt] * 2)
    start = 0 if text == "t5" else ids.shape[1]  # a decoder-only LLM's output starts with its input
    for kw in (dict(num_beams=1, max_new_tokens=6, min_new_tokens=3), dict(num_beams=3, max_new_tokens=6, min_new_tokens=1),
               dict(export_hf.CAPTION_DEFAULTS)):
        kw.pop("do_sample", None)
        got = ours.llm.generate_tokens(soft, **kw)
        want = hf.generate(pixel_values=img, input_ids=ids, attention_mask=mask,
                           generation_config=hf.generation_config, **kw)
        assert torch.equal(got, want[:, start:]), (kw, got, want)
    # back through pretrained.py: the same weights (the Llama's tables less the row the export added)
    back = blip2_stage2_from_hf(str(tmp_path), prompt=prompt)
    before, after = ours.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(after[k][: v.shape[0]], v), k


def test_stage1_export_computes_itc_and_itm_and_loads_back(bert, tmp_path):
    ours = tiny.perturb(Blip2Stage1(tiny.our_config(bert, ln_vision_eps=1e-6)), seed=2)
    export_hf.export(ours, str(tmp_path))
    hf, info = Blip2ForImageTextRetrieval.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    processor = Blip2Processor.from_pretrained(tmp_path)
    img, texts = images(2), CAPTIONS + ["the big circle"]
    t = processor(text=texts, padding="longest", return_tensors="pt")
    embeds = ours.image_embeds(img)[0]
    ids, mask = ours.tokenize(texts, "cpu")
    itc = ours.similarity(ours.image_feats(ours.qformer.encode_queries(embeds)[0]), ours.text_feats(ids, mask))
    close(itc, hf(pixel_values=img, input_ids=t.input_ids, attention_mask=t.attention_mask).logits_per_image)
    itm = hf(pixel_values=img, input_ids=t.input_ids[:2], attention_mask=t.attention_mask[:2],
             use_image_text_matching_head=True).logits_per_image  # (image i, text i)
    close(ours.itm_logits(embeds, ids[:2], mask[:2]), itm)
    back = blip2_stage1_from_hf(str(tmp_path))
    kept = {k: v for k, v in ours.state_dict().items() if not k.startswith("itg_head.") and k != "temp"}
    after = back.state_dict()
    for k, v in kept.items():
        assert torch.equal(after[k], v), k


def test_what_the_format_cannot_hold_is_refused(bert, tmp_path, monkeypatch):
    lm, tok = tiny_llm("opt")
    cases = [(Blip2Stage2(tiny.our_config(bert, num_frames=4), llm=FrozenLLM(lm, tok)), "frame embedding"),
             (Blip2Stage2(tiny.our_config(bert, feature_dim=16), llm=FrozenLLM(lm, tok)), "clip features"),
             (Blip2Stage2(tiny.our_config(bert, llm_prompt_suffix="\n"), llm=FrozenLLM(lm, tok, prompt_suffix="\n")),
              "llm_prompt_suffix"),
             (Blip2Stage2(tiny.our_config(bert, llm_prompt_prefix="</s>"),
                          llm=FrozenLLM(lm, tok, prompt_prefix="</s>")), "llm_prompt_prefix"),
             (Blip2Stage1(tiny.our_config(bert, vit_model="vit_base_patch16_clip_quickgelu_224",
                                          vit_kwargs=tiny.tiny_vit_kwargs())), "not EVA-style"),
             (Blip2Stage1(tiny.our_config(bert, stage1_losses=("itg",))), "trained without itc and itm")]
    for model, message in cases:
        with pytest.raises(ValueError, match=message):
            export_hf.export(model, str(tmp_path / "x"))
        assert not os.path.exists(tmp_path / "x")
    p = run_script("export_hf.py", f"--out_dir={tmp_path / 'x'}", ok=False)
    assert "give the checkpoint and the directory to write" in p.stderr.strip().splitlines()[-1]
    # a weight that lands wrong is caught by the export's own check before anything is written
    ours = tiny.perturb(Blip2Stage1(tiny.our_config(bert)), seed=2)
    original = export_hf.ours_to_hf

    def swapped(*args, **kwargs):
        out = original(*args, **kwargs)
        out["vision_model.post_layernorm.weight"] = out["vision_model.post_layernorm.weight"].flip(0)
        return out
    monkeypatch.setattr(export_hf, "ours_to_hf", swapped)
    with pytest.raises(ValueError, match="ITC scores differ"):
        export_hf.export(ours, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.slow
def test_tiny_world_stage2_captions_alike_in_eval_and_transformers(tiny_world, tmp_path):
    """The quick start's path at CI size: stages 1 and 2 on the tiny world, export, then the captions transformers
    writes for the validation scenes (processor + generate, as the README shows) are eval.py's."""
    w, s1, s2, out = tiny_world, str(tmp_path / "s1"), str(tmp_path / "s2"), str(tmp_path / "hf")
    train_tiny(1, w, s1, "--max_steps=4", "--lr_decay_steps=4", "--warmup_steps=1", "--eval_interval=100")
    train_tiny(2, w, s2, f"--stage1_ckpt={s1}/ckpt.pt", "--max_steps=20", "--lr_decay_steps=20",
               "--warmup_steps=2", "--eval_interval=100", "--lr=3e-3")
    run_script("export_hf.py", f"--ckpt={s2}/ckpt.pt", f"--out_dir={out}")
    run_script("eval.py", "--task=caption", f"--ckpt={s2}/ckpt.pt", f"--ann_file={w}/val.json",
               f"--image_root={w}/images", "--device=cpu", "--dtype=float32", "--num_workers=0",
               "--caption_scorers=['BLEU']", f"--out_dir={tmp_path / 'eval'}")
    with open(tmp_path / "eval" / "caption_captions.json") as f:
        expected = {r["image_id"]: r["caption"] for r in json.load(f)}
    model = Blip2ForConditionalGeneration.from_pretrained(out)
    processor = Blip2Processor.from_pretrained(out, backend="pil")  # PIL's bicubic resize, as eval.py's
    got, next_word = {}, []
    for name in expected:
        inputs = processor(images=Image.open(os.path.join(w, "images", name)), return_tensors="pt")
        ids = model.generate(**inputs, generation_config=model.generation_config)
        got[name] = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
        with torch.no_grad():  # the exported model's logits after its image tokens, BOS and first word
            next_word.append(model(**inputs, input_ids=ids[:, :model.config.num_query_tokens + 2]).logits[0, -1])
    assert got == expected
    # the image reaches the exported LLM (20 steps on 32 scenes may still write one caption for every scene)
    assert max((x - next_word[0]).abs().max().item() for x in next_word[1:]) > 1e-3
