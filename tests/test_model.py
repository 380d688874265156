"""model.py against Hugging Face's own BLIP-2, BERT, OPT and T5 on tiny random weights, plus masks, losses,
gradients and bad input."""

import pytest
import torch
from transformers import BertForMaskedLM, BertTokenizerFast
from transformers.loss.loss_utils import ForCausalLMLoss

from dev import bench
import tiny
from tiny import close
from backbones import FrozenLLM, FrozenT5LLM, FrozenViT, split_captions, wrap_llm
from model import Blip2Stage1, PFormer, sample_negatives
from train_common import compile_blocks
from pretrained import blip2_stage1_from_hf, blip2_stage2_from_hf, init_from_bert

CAPTIONS = ["a red square", "two blue stars", "the big circle", "a small green triangle"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny.bert_dir(str(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module", params=["opt", "t5"])
def stage2_pair(request):
    hf, tok = tiny.hf_blip2(request.param)
    return hf, blip2_stage2_from_hf(hf, tokenizer=tok), tok


def images(n=2, seed=0):
    return torch.randn(n, 3, tiny.IMAGE, tiny.IMAGE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- parity with Blip2ForConditionalGeneration

def test_vision_and_qformer_match_hf(stage2_pair):
    hf, ours, _ = stage2_pair
    img = images()
    feats = ours.image_embeds(img)[0]
    close(feats, hf.vision_model(img).last_hidden_state)  # B x 5 x 64
    Z, _ = ours.qformer.encode_queries(feats)
    close(Z, hf.get_image_features(img).qformer_outputs.last_hidden_state)  # B x 8 x 64


@pytest.mark.parametrize("text", ["opt", "llama", "bloom"])
def test_decoder_only_logits_loss_and_generation_match_hf(text):
    hf, tok = tiny.hf_blip2(text)
    ours = blip2_stage2_from_hf(hf, tokenizer=tok)
    img, caps, Q = images(), CAPTIONS[:2], hf.config.num_query_tokens
    inputs = ours.llm.inputs(ours.soft_prompt(img), caps)
    labels = inputs.pop("labels")
    logits = ours.llm.model(**inputs).logits
    # HF's input: [image token] * Q + BOS + caption + "\n", the image tokens replaced by the projected queries
    t = tok([c + "\n" for c in caps], padding="longest", return_tensors="pt")
    ids = torch.cat([torch.full((2, Q), hf.config.image_token_index), t.input_ids], 1)
    mask = torch.cat([torch.ones(2, Q, dtype=torch.long), t.attention_mask], 1)
    ref = hf(pixel_values=img, input_ids=ids, attention_mask=mask).logits
    close(logits, ref)
    assert (labels[:, :Q] == -100).all() and (labels[:, Q:][t.attention_mask == 0] == -100).all()
    ref_loss = ForCausalLMLoss(ref.contiguous(), labels, ref.shape[-1])
    close(ours(img, caps)["loss"], ref_loss)
    for beams in (1, 3):
        kw = dict(num_beams=beams, max_new_tokens=6, min_new_tokens=3)
        got = ours.llm.generate_tokens(ours.soft_prompt(img), **kw)
        want = hf.generate(pixel_values=img, eos_token_id=ours.llm.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
        assert torch.equal(got, want[:, Q + 1:])  # HF also returns its input ids: Q image tokens + BOS
        assert got.shape[1] >= 3
        assert ours.generate(img, **kw) == [s.strip() for s in tok.batch_decode(got, skip_special_tokens=True)]


def test_t5_loss_and_generation_match_hf():
    """FlanT5 unties its LM head from the embeddings: so does this tiny T5 (a tied one would hide a mix-up)."""
    hf, tok = tiny.hf_blip2("t5")
    lm = hf.language_model
    assert lm.lm_head.weight.data_ptr() != lm.shared.weight.data_ptr()
    assert not torch.equal(lm.lm_head.weight, lm.shared.weight)
    ours = blip2_stage2_from_hf(hf, tokenizer=tok, prompt="a photo of")
    img, caps, Q = images(), CAPTIONS[:2], hf.config.num_query_tokens
    p = tok(["a photo of"] * 2, return_tensors="pt")  # the encoder reads [queries; prompt </s>]
    ids = torch.cat([torch.full((2, Q), hf.config.image_token_index), p.input_ids], 1)
    mask = torch.cat([torch.ones(2, Q, dtype=torch.long), p.attention_mask], 1)
    y = tok(caps, padding="longest", return_tensors="pt")
    labels = y.input_ids.masked_fill(y.attention_mask == 0, -100)
    ref = hf(pixel_values=img, input_ids=ids, attention_mask=mask, labels=labels)
    inputs = ours.llm.inputs(ours.soft_prompt(img), caps)
    real = y.attention_mask.bool()  # we also mask the decoder's padding, so only real positions compare
    close(ours.llm.model(**inputs).logits[real], ref.logits[real])
    close(ours(img, caps)["loss"], ref.loss)
    for beams in (1, 3):
        kw = dict(num_beams=beams, max_new_tokens=6, min_new_tokens=3)
        got = ours.llm.generate_tokens(ours.soft_prompt(img), **kw)
        want = hf.generate(pixel_values=img, input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(got, want)


def test_load_from_saved_directory(tmp_path):
    hf, tok = tiny.hf_blip2("opt", seed=3)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ours = blip2_stage2_from_hf(str(tmp_path))
    img = images()
    close(ours.soft_prompt(img), hf.get_image_features(img).pooler_output)


# ---------------------------------------------------------------- parity with Blip2ForImageTextRetrieval and BERT

def test_itc_and_itm_match_hf_retrieval(bert):
    tok = tiny.bert_tokenizer(bert)
    hf = tiny.hf_blip2_retrieval(tok)
    ours = blip2_stage1_from_hf(hf, tokenizer=bert)
    img = images(2)
    t = tok(CAPTIONS[:3], padding="max_length", max_length=16, return_tensors="pt")
    itc = hf(pixel_values=img, input_ids=t.input_ids, attention_mask=t.attention_mask).logits_per_image  # 2 x 3
    embeds = ours.image_embeds(img)[0]
    img_feats = ours.image_feats(ours.qformer.encode_queries(embeds)[0])
    close(ours.similarity(img_feats, ours.text_feats(t.input_ids, t.attention_mask)), itc)
    t2 = tok(CAPTIONS[:2], padding="max_length", max_length=16, return_tensors="pt")
    itm = hf(pixel_values=img, input_ids=t2.input_ids, attention_mask=t2.attention_mask,
             use_image_text_matching_head=True).logits_per_image  # 2 x 2: (image i, text i)
    close(ours.itm_logits(embeds, t2.input_ids, t2.attention_mask), itm)


def test_bert_init_reproduces_bert(bert):
    ours = init_from_bert(Blip2Stage1(tiny.our_config(bert)), bert)
    ref = BertForMaskedLM.from_pretrained(bert).eval()
    t = ours.tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    out = ref(t.input_ids, attention_mask=t.attention_mask, output_hidden_states=True)
    h = ours.qformer.encode_text(t.input_ids, t.attention_mask)
    real = t.attention_mask.bool()
    close(h[real], out.hidden_states[-1][real])
    V = ref.config.vocab_size
    close(ours.itg_head(h, ours.qformer.word_embeddings.weight)[..., :V][real], out.logits[real], 1e-4)
    # the query FFN starts as a copy of BERT's FFN, cross-attention is new
    layer = ours.qformer.layers[0]
    assert torch.equal(layer.ffn_query.fc1.weight, layer.ffn_text.fc1.weight)
    assert torch.equal(layer.ffn_text.fc1.weight, ref.bert.encoder.layer[0].intermediate.dense.weight)
    assert ours.tokenizer.convert_tokens_to_ids("[DEC]") == ours.dec_token_id == V


def test_the_qformer_vocabulary_is_its_tokenizers_with_dec(bert):
    """vocab_size is not typed anywhere: BERT's tokens + [DEC], for the Q-Former and for the P-Former; a vocab_size
    given smaller than that is an error naming both."""
    tokens = len(BertTokenizerFast.from_pretrained(bert)) + 1
    stage1 = Blip2Stage1(tiny.our_config(bert))
    assert stage1.config.vocab_size == tokens == stage1.qformer.word_embeddings.num_embeddings
    assert stage1.itg_head.bias.shape == (tokens,)
    assert PFormer(tiny.our_config(bert), llm_dim=16).encoder.word_embeddings.num_embeddings == tokens
    assert Blip2Stage1(tiny.our_config(bert, vocab_size=tokens + 3)).config.vocab_size == tokens + 3
    with pytest.raises(ValueError, match=f"has {tokens} tokens \\(with \\[DEC\\]\\) but vocab_size={tokens - 1}"):
        Blip2Stage1(tiny.our_config(bert, vocab_size=tokens - 1))


def test_bert_init_from_an_in_memory_bert_model(bert):
    """A BertModel object (no MLM head): the encoder loads, the ITG head keeps its fresh init."""
    ref = BertForMaskedLM.from_pretrained(bert).bert.eval()
    ours = Blip2Stage1(tiny.our_config(bert))
    head = ours.itg_head.dense.weight.clone()
    init_from_bert(ours, ref)
    t = ours.tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    real = t.attention_mask.bool()
    close(ours.qformer.encode_text(t.input_ids, t.attention_mask)[real],
          ref(t.input_ids, attention_mask=t.attention_mask).last_hidden_state[real])
    assert torch.equal(ours.itg_head.dense.weight, head)


# ---------------------------------------------------------------- masks

@pytest.fixture(scope="module")
def stage1(bert):
    torch.manual_seed(0)
    return init_from_bert(Blip2Stage1(tiny.our_config(bert)), bert).eval()


def test_itg_is_causal_and_queries_never_see_text(stage1):
    q = stage1.qformer
    embeds = stage1.image_embeds(images(2))[0]
    ids, mask = stage1.tokenize(["a red square left of a blue star", "two big circles"], "cpu")
    ids2 = ids.clone()
    ids2[:, 4:] = ids2[:, 4:].flip(1)  # change every text token from position 4 on
    Z, kvs = q.encode_queries(embeds)
    h1, h2 = q.decode_text(ids, mask, kvs), q.decode_text(ids2, mask, kvs)
    close(h1[:, :4], h2[:, :4], 0)  # earlier tokens do not see later ones
    assert (h1[:, 4:] - h2[:, 4:]).abs().amax() > 1e-3
    # the cached path equals one joint pass over [queries; text] under the multimodal-causal mask, in which
    # the query outputs are the ITC query outputs whatever the text
    Qn, T = Z.shape[1], ids.shape[1]
    allowed = torch.ones(Qn + T, Qn + T, dtype=torch.bool).tril()
    allowed[:, :Qn] = True
    allowed[:Qn, Qn:] = False
    keys = torch.cat([torch.ones(2, Qn, dtype=torch.bool), mask.bool()], 1)
    for text in (ids, ids2):
        joint, _ = q._run(q.embed(text, with_queries=True), Qn, allowed & keys[:, None, None, :], embeds)
        close(joint[:, :Qn], Z)
    close(joint[:, Qn:], h2)


def test_itc_query_pass_never_sees_text(stage1):
    seen = []
    hook = stage1.vision_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    img = images(4)
    stage1(img, CAPTIONS)
    stage1(img, CAPTIONS[::-1])
    hook.remove()
    assert len(seen) == 2
    close(seen[0], seen[1], 0)


def pad_to_max_length(model, captions, device):
    """Stage-1 tokens padded to max_txt_len, as under DDP (one process pads to the batch's longest caption)."""
    t = model.tokenizer(captions, padding="max_length", truncation=True, max_length=model.config.max_txt_len,
                        return_tensors="pt")
    return t.input_ids.to(device), t.attention_mask.to(device)


def test_text_padding_is_hidden(stage1):
    ids, mask = pad_to_max_length(stage1, ["a red square"], "cpu")
    assert (mask == 0).sum() > 10
    h = stage1.qformer.encode_text(ids, mask)
    ids2 = ids.clone()
    ids2[mask == 0] = 7  # garbage under the padding
    h2 = stage1.qformer.encode_text(ids2, mask)
    close(h[mask.bool()], h2[mask.bool()])


def test_stage1_reads_each_image_once_and_pads_to_the_longest_caption_with_the_same_losses_and_gradients(stage1):
    """Stage 1 pads its text to the batch's longest caption and projects each image's cross-attention keys and values
    once per step for the query pass and ITM's three pairs: the same losses and gradients (1e-6) as text padded to
    max_txt_len with every pass projecting the image anew (bench.stage1_as_before, as LAVIS computes it)."""
    img = images(4)
    ids, _ = stage1.tokenize(CAPTIONS, "cpu")
    assert ids.shape[1] < stage1.config.max_txt_len  # the saving under test
    cross = [layer.cross_attn for layer in stage1.qformer.layers if layer.cross_attn is not None]
    rows = []  # images through each key projection
    hooks = [a.key.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0])) for a in cross]

    def losses_and_grads():
        stage1.zero_grad()
        rows.clear()
        out = stage1(img, CAPTIONS, neg_generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in stage1.named_parameters() if p.grad is not None}
        stage1.zero_grad()
        return out, grads, sum(rows)

    try:
        after, after_grads, after_rows = losses_and_grads()
        with bench.stage1_as_before(stage1):
            before, before_grads, before_rows = losses_and_grads()
        again = losses_and_grads()  # the context restored the model
    finally:
        for h in hooks:
            h.remove()
    assert after_rows == len(img) * len(cross) and before_rows == 4 * len(img) * len(cross), (after_rows, before_rows)
    assert again[2] == after_rows
    for k in ("loss", "itc", "itm", "itg"):
        close(after[k], before[k], 1e-6)
    assert after_grads.keys() == before_grads.keys() and len(after_grads) > 10
    assert "qformer.layers.0.cross_attn.key.weight" in after_grads and "ln_vision.weight" in after_grads
    for n in after_grads:  # temp's gradient carries 1 / temp^2 (about 200) times the similarities' float32 rounding
        close(after_grads[n], before_grads[n], 3e-6 if n == "temp" else 1e-6)


def test_negative_sampling_follows_softmax_and_skips_positives():
    sim = torch.tensor([[0.0, 2.0, 1.0, -1.0]]).repeat(20000, 1)
    own = torch.zeros(20000, 4, dtype=torch.bool)
    own[:, 0] = True
    noise = torch.empty(20000, 4).exponential_(generator=torch.Generator().manual_seed(0))
    picks = sample_negatives(sim, own, noise)
    freq = torch.bincount(picks, minlength=4).float() / len(picks)
    want = torch.softmax(torch.tensor([-1e4, 2.0, 1.0, -1.0]), 0)
    assert freq[0] == 0
    close(freq, want, 0.02)


# ---------------------------------------------------------------- losses, gradients, frozen parts

def trainable_and_frozen(model):
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return names, frozen


def check_gradients(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    trainable, frozen = trainable_and_frozen(model)
    assert trainable and frozen
    assert all(n.startswith(("visual.", "llm.")) for n in frozen)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


def test_stage1_losses_gradients_and_overfit(bert):
    torch.manual_seed(0)
    model = init_from_bert(Blip2Stage1(tiny.our_config(bert)), bert).train()
    img = images(4)
    out = model(img, CAPTIONS)
    assert set(out) == {"loss", "itc", "itm", "itg"}
    assert all(torch.isfinite(v) for v in out.values())
    for name in ("itc", "itm", "itg"):  # each loss reaches the Q-Former
        model.zero_grad(set_to_none=True)
        model(img, CAPTIONS)[name].backward()
        assert model.qformer.layers[0].self_attn.query.weight.grad.abs().sum() > 0, name
    check_gradients(model, model(img, CAPTIONS)["loss"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first = {k: v.item() for k, v in model(img, CAPTIONS).items()}
    for _ in range(40):
        opt.zero_grad()
        model(img, CAPTIONS)["loss"].backward()
        opt.step()
    last = {k: v.item() for k, v in model(img, CAPTIONS).items()}
    assert last["loss"] < 0.6 * first["loss"], (first, last)
    assert last["itg"] < 0.5 * first["itg"] and last["itc"] < first["itc"], (first, last)


@pytest.mark.parametrize("text,factor", [("opt", 0.5), ("llama", 0.5), ("t5", 0.7)])  # a random T5 listens less to its encoder
def test_stage2_loss_gradients_and_overfit(text, factor):
    hf, tok = tiny.hf_blip2(text)
    model = blip2_stage2_from_hf(hf, tokenizer=tok).train()
    img, caps = images(2), CAPTIONS[:2]
    check_gradients(model, model(img, caps)["loss"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = model(img, caps)["loss"].item()
    for _ in range(40):
        opt.zero_grad()
        model(img, caps)["loss"].backward()
        opt.step()
    assert model(img, caps)["loss"].item() < factor * first


def test_frozen_parts_stay_frozen_and_in_eval_mode(stage2_pair, stage1):
    _, model, _ = stage2_pair
    for m in (model, stage1):
        m.train()
        assert m.qformer.training and m.ln_vision.training
        assert not any(x.training for x in m.visual.modules())
        assert not any(p.requires_grad for p in m.visual.parameters())
    assert not any(x.training for x in model.llm.modules())
    assert not any(p.requires_grad for p in model.llm.parameters())
    # the frozen LLM and ViT are unchanged by a training step
    before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(images(2), CAPTIONS[:2])["loss"].backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    stage1.eval()


def test_split_captions_never_crashes_and_never_empties_the_target():
    torch.manual_seed(0)
    prefixes, targets = split_captions(["dog", "a red square", ""] * 20, random_split=True)
    assert all(t for t, c in zip(targets, ["dog", "a red square", ""] * 20) if c)
    assert {p for p, t in zip(prefixes, targets) if t == "dog"} == {""}
    assert set(prefixes[1::3]) == {"", "a", "a red"}
    assert split_captions(["a b"], prompt="p") == (["p"], ["a b"])


# ---------------------------------------------------------------- bad input

def test_unknown_encoder_and_llm_names(bert):
    with pytest.raises(ValueError, match="unknown image encoder 'not_a_vit'"):
        FrozenViT(tiny.our_config(bert, vit_model="not_a_vit"))
    with pytest.raises(ValueError, match="cannot load LLM 'no-such-org/no-such-llm'"):
        FrozenLLM.from_pretrained("no-such-org/no-such-llm")
    with pytest.raises(ValueError, match="vit_layers=5 but"):
        FrozenViT(tiny.our_config(bert, vit_layers=5))


def test_wrong_image_size(stage1):
    with pytest.raises(ValueError, match=r"expected images of shape B x 3 x 28 x 28 .*got \(2, 3, 32, 32\)"):
        stage1(torch.randn(2, 3, 32, 32), CAPTIONS[:2])


def test_checkpoint_that_does_not_fit(bert):
    tok = tiny.bert_tokenizer(bert)
    hf = tiny.hf_blip2_retrieval(tok)
    hf.qformer.encoder.layer[0].attention.attention.query.weight = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"shape mismatch \(1\): qformer\.layers\.0\.self_attn\.query\.weight \(3, 3\)"):
        blip2_stage1_from_hf(hf, tokenizer=bert)
    hf = tiny.hf_blip2_retrieval(tok)
    del hf.itm_head
    with pytest.raises(ValueError, match=r"missing \(2\): itm_head\.bias, itm_head\.weight"):
        blip2_stage1_from_hf(hf, tokenizer=bert)
    hf = tiny.hf_blip2_retrieval(tok)
    hf.register_parameter("extra_head", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match=r"checkpoint key with no place in this model: extra_head"):
        blip2_stage1_from_hf(hf, tokenizer=bert)


def test_clip_vit_l_variant_keeps_ln_pre_and_drops_the_last_block(bert):
    """CLIP ViT-L/14 (QuickGELU, ln_pre): BLIP-2 keeps 23 of 24 blocks and no ln_post; here 2 of 3, tiny."""
    c = tiny.our_config(bert, vit_model="vit_large_patch14_clip_quickgelu_224", vit_layers=2,
                        vit_kwargs=dict(patch_size=14, embed_dim=64, depth=3, num_heads=4))
    vit = FrozenViT(c)
    assert len(vit.vit.blocks) == 2 and isinstance(vit.vit.norm, torch.nn.Identity)
    assert isinstance(vit.vit.norm_pre, torch.nn.LayerNorm)
    x = images()
    h = vit.vit.norm_pre(vit.vit._pos_embed(vit.vit.patch_embed(x)))
    for block in vit.vit.blocks:
        h = block(h)
    close(vit(x), h)  # the raw output of the last kept block, CLS included: B x 5 x 64


def test_half_precision_frozen_vit(bert):
    """Frozen weights in half precision, LayerNorm parameters in fp32, run under autocast (bf16 on CPU here); the
    output is float32, the dtype of the trainable parts that read it."""
    full = FrozenViT(tiny.our_config(bert))
    torch.manual_seed(0)
    half = FrozenViT(tiny.our_config(bert, vit_dtype="bfloat16"))
    half.vit.load_state_dict({k: v.to(half.vit.state_dict()[k].dtype) for k, v in full.vit.state_dict().items()})
    assert half.vit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert half.vit.blocks[0].norm1.weight.dtype == torch.float32
    x = images()
    out = half(x)
    assert out.dtype == torch.float32 and out.shape == full(x).shape
    assert (out - full(x)).abs().max() < 0.1 * full(x).abs().max()


def test_compile_blocks_keeps_the_loss_and_names_and_never_recompiles_for_new_captions():
    """train_common's compile=True: the blocks are compiled, the captions' Python is not, so a batch with other
    captions (same lengths) runs the compiled code again instead of recompiling (a whole-model torch.compile
    specialises on the strings); parameter names, hence checkpoints, are unchanged."""
    hf, tok = tiny.hf_blip2("opt")
    model = blip2_stage2_from_hf(hf, tokenizer=tok).train()
    names = [n for n, _ in model.named_parameters()]
    img = images(2)
    first, second = ["a red square", "two blue star"], ["a big circle", "the small dot"]  # byte tokens: same lengths
    eager = model(img, first)["loss"]
    compile_blocks(model, backend="eager")  # dynamo's graphs and guards without inductor's code generation
    assert [n for n, _ in model.named_parameters()] == names
    torch._dynamo.reset()
    compiled = model(img, first)["loss"]
    compiled.backward()
    close(compiled, eager)
    with torch._dynamo.config.patch(error_on_recompile=True):
        model(img, second)["loss"].backward()


# ---------------------------------------------------------------- differences from the official training, decided


def test_hf_vision_tower_of_an_uncommon_width_loads():
    """44 wide with an MLP of 98: 98 / 44 * 44 rounds down to 97 hidden units in timm unless built exactly."""
    hf, tok = tiny.hf_blip2("opt", vision_config=dict(hidden_size=44, intermediate_size=98, num_attention_heads=4),
                            qformer_config=dict(encoder_hidden_size=44))
    ours = blip2_stage2_from_hf(hf, tokenizer=tok)
    assert ours.visual.vit.blocks[0].mlp.fc1.out_features == 98
    close(ours.image_embeds(images())[0], hf.vision_model(images()).last_hidden_state)


def test_stage2_text_prompt_is_joined_and_hidden_as_lavis_does():
    """With prompt "a photo of", the LLM reads "a photo of " + caption; exactly BOS and the prompt's tokens are hidden
    from the loss, so the caption's first word (after its space) is learned."""
    from world import byte_tokenizer

    hf, tok = tiny.hf_blip2("opt")
    llm = FrozenLLM(hf.language_model, byte_tokenizer(), prompt="a photo of")
    soft = torch.zeros(2, 3, llm.dim)
    inputs = llm.inputs(soft, ["red square", "a big circle"])
    labels, embeds = inputs["labels"], inputs["inputs_embeds"]
    hidden = len(tok("a photo of").input_ids)  # BOS + 10 bytes = 11
    assert hidden == 11 and (labels[:, :3 + hidden] == -100).all()
    targets = [llm.tokenizer.decode([t for t in row[3 + hidden:].tolist() if t != -100]) for row in labels]
    assert targets == [" red square\n", " a big circle\n"]
    joined = llm.tokenizer(["a photo of red square\n"]).input_ids[0]
    assert torch.equal(embeds[0, 3:3 + len(joined)], llm.embed(torch.tensor(joined)))


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_prompt_prefix_and_suffix_frame_the_soft_prompt_in_the_loss_and_in_generation(text):
    """llm_prompt_prefix / llm_prompt_suffix: their token embeddings come before / after the soft prompt: the loss and
    the generated tokens are those of a plain LLM given [prefix embeddings; soft prompt; suffix embeddings] (and a
    soft-prompt mask grows by both)."""
    from world import byte_tokenizer

    hf, tok = tiny.hf_blip2(text)
    tok = byte_tokenizer(t5=text == "t5")
    plain = wrap_llm(hf.language_model, tok)
    framed = wrap_llm(hf.language_model, tok, prompt_prefix=tok.eos_token, prompt_suffix="\n")
    soft = torch.randn(2, 3, plain.dim, generator=torch.Generator().manual_seed(0))
    eos, nl = [torch.tensor(tok(t, add_special_tokens=False).input_ids) for t in (tok.eos_token, "\n")]
    assert framed.prefix_ids == eos.tolist() == [tok.eos_token_id] and framed.suffix_ids == nl.tolist()
    joined = torch.cat([plain.embed(eos)[None].expand(2, -1, -1), soft, plain.embed(nl)[None].expand(2, -1, -1)],
                       dim=1)  # B x (1 + Q + 1) x d
    texts = ["red square", "a big circle"]
    close(framed.lm_loss(soft, texts), plain.lm_loss(joined, texts))
    for prefix, suffix in [("", "\n"), (tok.eos_token, "")]:  # each of the two is read
        one = wrap_llm(hf.language_model, tok, prompt_prefix=prefix, prompt_suffix=suffix)
        assert (framed.lm_loss(soft, texts) - one.lm_loss(soft, texts)).abs() > 1e-4
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    got = framed.generate_tokens(soft, prompt="", num_beams=1, max_new_tokens=5, prompt_mask=mask)
    one = torch.ones(2, 1, dtype=mask.dtype)
    want = plain.generate_tokens(joined, prompt="", num_beams=1, max_new_tokens=5,
                                 prompt_mask=torch.cat([one, mask, one], dim=1))
    assert torch.equal(got, want)


def test_each_llm_gets_its_own_path():
    """wrap_llm reads the HF config: FlanT5 gets the encoder-decoder path (stops at </s>, prompts padded right, the
    prefix split option), a causal LM the decoder-only one (stops at "\n"); a class given the other kind refuses."""
    t5, t5_tok = tiny.hf_blip2("t5")
    opt, opt_tok = tiny.hf_blip2("opt")
    llm = wrap_llm(t5.language_model, t5_tok, t5_prefix_split=True)
    assert type(llm) is FrozenT5LLM and llm.prefix_split and llm.eos_token_id == t5_tok.eos_token_id
    assert llm.prompt_padding_side == "right"
    llm = wrap_llm(opt.language_model, opt_tok, t5_prefix_split=True)  # stage 0's default, meaningless here
    assert type(llm) is FrozenLLM and llm.eos_token_id == opt_tok("\n", add_special_tokens=False).input_ids[-1]
    assert llm.prompt_padding_side == "left" and not hasattr(llm, "prefix_split")
    with pytest.raises(ValueError, match=r"FrozenLLM cannot wrap T5ForConditionalGeneration .*wrap_llm"):
        FrozenLLM(t5.language_model, t5_tok)
    with pytest.raises(ValueError, match=r"FrozenT5LLM cannot wrap OPTForCausalLM .*wrap_llm"):
        FrozenT5LLM(opt.language_model, opt_tok)


def test_frozen_llm_dropout_is_an_option():
    """llm_dropout=True: the frozen OPT's own dropout is on in training (the official code leaves it in train mode);
    the default keeps it in eval mode. Its weights get no gradient either way."""
    hf, tok = tiny.hf_blip2("opt", text_config=dict(dropout=0.1))  # OPT-2.7b's own dropout
    for dropout in (False, True):
        llm = FrozenLLM(hf.language_model, tok, dropout=dropout).train()
        assert llm.model.training is dropout and not llm.training
        soft = torch.randn(2, 4, llm.dim)
        a, b = llm.lm_loss(soft, CAPTIONS[:2]), llm.lm_loss(soft, CAPTIONS[:2])
        assert bool(a != b) is dropout
        llm.eval()
        assert not llm.model.training and llm.lm_loss(soft, CAPTIONS[:2]) == llm.lm_loss(soft, CAPTIONS[:2])
    assert not any(p.requires_grad for p in llm.parameters())


def test_captions_of_one_image_are_positives(bert):
    """COCO has five captions per image, one training pair each: with image ids, ITC spreads its targets over the
    captions of the same image and ITM never draws them as negatives (LAVIS since 2023); same_image_positives=False
    keeps the papers' rule, each sample matching only itself."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = Blip2Stage1(tiny.our_config(bert)).eval()
    ids = torch.tensor([7, 7, 9, 11])
    pos = model.positives(ids, B=4, device="cpu")
    assert pos.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert model.positives(None, B=4, device="cpu").equal(torch.eye(4, dtype=torch.bool))
    img, txt = F.normalize(torch.randn(4, 8, 32), dim=-1), F.normalize(torch.randn(4, 32), dim=-1)
    loss, sim_i2t, _ = model.itc_loss(img, txt, pos)
    soft = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    soft = 0.9 * soft + 0.1 / 4  # label smoothing 0.1
    _, sim_i2t, sim_t2i = model.itc_loss(img, txt, pos)
    manual = -((soft * sim_i2t.log_softmax(1)).sum(1).mean() + (soft * sim_t2i.log_softmax(1)).sum(1).mean()) / 2
    close(loss, manual, 1e-6)
    # the same-image caption is never a negative, even when it is by far the most similar
    sim = torch.tensor([[0.0, 50.0, 1.0, 1.0]]).expand(1000, 4)
    noise = torch.empty(1000, 4).exponential_(generator=torch.Generator().manual_seed(0))
    assert set(sample_negatives(sim, pos[:1].expand(1000, 4), noise).tolist()) <= {2, 3}
    model.config.same_image_positives = False
    assert model.positives(ids, B=4, device="cpu").equal(torch.eye(4, dtype=torch.bool))
    model.config.same_image_positives = True
