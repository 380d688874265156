"""Tiny, offline stand-ins for bert-base-uncased, OPT, FlanT5 and EVA ViT-g, for tests.

Everything is built from random weights and small hand-written vocabularies, saved in each library's own
format when a directory is needed, and loaded through the same code paths as the real models."""

import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                          Blip2QFormerConfig, Blip2VisionConfig, BertConfig, BertForMaskedLM,
                          BloomConfig, LlamaConfig, OPTConfig, T5Config)

from model import Blip2Config as OurConfig
from world import bert_tokenizer, byte_tokenizer

IMAGE = 28  # 2 x 2 patches of 14 px + CLS = 5 image tokens
HIDDEN = 64
INIT_STD = 0.3  # an expressive random LLM, so that a soft prompt can steer it in overfitting tests


def close(a, b, tol=1e-5):
    """a equals b in shape and to tol, elementwise; relatively where b exceeds 1 (float32's spacing at 512 is 6e-5,
    so two correct sums of a loss of 512 may differ by more than 1e-5)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), (err, b.abs().max().item())


def perturb(model, std=0.02, seed=0):
    """Random offsets on every parameter, so that LayerNorms, biases and zero-initialised tensors differ
    from their defaults and a swapped or skipped weight shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
            if name.endswith("self_attn.qkv.bias"):  # like the real checkpoints: q and v bias, no key bias
                p[p.shape[0] // 3: 2 * p.shape[0] // 3] = 0
    return model.eval()


def hf_blip2_config(text="opt", bert_vocab=None, vocab=None, num_query_tokens=8):
    """A tiny Hugging Face Blip2Config: vision, Q-Former and LLM hidden 64, 2 layers each, 8 queries."""
    vision = Blip2VisionConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               image_size=IMAGE, patch_size=14, qkv_bias=True)
    qformer = Blip2QFormerConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 cross_attention_frequency=2, encoder_hidden_size=HIDDEN, max_position_embeddings=64,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 vocab_size=bert_vocab or 30523, use_qformer_text_input=bert_vocab is not None)
    if text == "opt":
        text_config = OPTConfig(hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=vocab, max_position_embeddings=128, word_embed_proj_dim=HIDDEN,
                                dropout=0.0, attention_dropout=0.0, init_std=INIT_STD, pad_token_id=1, bos_token_id=2, eos_token_id=2)
        image_token_index = vocab - 1
    elif text == "llama":  # the Llama family (SmolLM2, Qwen-like): RoPE, RMSNorm, SwiGLU, grouped KV heads
        text_config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                                  initializer_range=INIT_STD, pad_token_id=1, bos_token_id=2, eos_token_id=2)
        image_token_index = vocab - 1
    elif text == "bloom":  # ALiBi positions from the 2-D mask, a LayerNorm on the input embeddings
        text_config = BloomConfig(hidden_size=HIDDEN, n_layer=2, n_head=4, vocab_size=vocab, hidden_dropout=0.0,
                                  attention_dropout=0.0, initializer_range=INIT_STD, pad_token_id=1, bos_token_id=2,
                                  eos_token_id=2)
        image_token_index = vocab - 1
    elif text == "t5":
        text_config = T5Config(vocab_size=vocab, d_model=HIDDEN, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                               dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                               feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                               initializer_factor=1.0)
        image_token_index = vocab - 1
    else:
        text_config, image_token_index = None, None
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                       text_config=text_config.to_dict() if text_config else None,
                       num_query_tokens=num_query_tokens, image_token_index=image_token_index,
                       image_text_hidden_size=32)


def hf_blip2(text="opt", seed=0, **config_changes):
    """(tiny random Blip2ForConditionalGeneration with an OPT, Llama, BLOOM or T5 LLM, its LLM tokenizer). The T5
    has its own LM head, as FlanT5 has (transformers' T5Config ties it to the embeddings whatever
    tie_word_embeddings says)."""
    torch.manual_seed(seed)
    tok = byte_tokenizer(t5=text == "t5")
    config = hf_blip2_config(text, vocab=len(tok) + 1)
    for k, v in config_changes.items():  # e.g. vision_config={"hidden_size": 44, ...}
        for name, value in v.items():
            setattr(getattr(config, k), name, value)
    model = Blip2ForConditionalGeneration(config)
    if text == "t5":
        lm = model.language_model
        lm.lm_head.weight = torch.nn.Parameter(lm.shared.weight.detach().clone())
        for tied in (lm.all_tied_weights_keys, model.all_tied_weights_keys):
            for key in [k for k in tied if k.endswith("lm_head.weight")]:
                tied.pop(key)
    return perturb(model, seed=seed), tok


def hf_blip2_retrieval(bert_tok, seed=0):
    """A tiny random Blip2ForImageTextRetrieval whose Q-Former vocabulary is `bert_tok`'s plus [DEC]."""
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(hf_blip2_config(text=None, bert_vocab=len(bert_tok) + 1))
    return perturb(model, seed=seed)


def bert_dir(directory, seed=0):
    """A tiny random BertForMaskedLM (hidden 64, 2 layers) with its tokenizer, saved as a HF directory."""
    torch.manual_seed(seed)
    tok = bert_tokenizer(directory)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    perturb(bert, seed=seed).save_pretrained(directory)
    return directory


def tiny_vit_kwargs():
    return dict(patch_size=14, embed_dim=HIDDEN, depth=3, num_heads=4, mlp_ratio=2.0)


def our_config(bert, **overrides):
    """A tiny Blip2Config: EVA-style timm ViT (3 blocks, 2 kept), BERT-shaped Q-Former of hidden 64."""
    c = dict(vit_model="eva_giant_patch14_clip_224", vit_layers=2, vit_pretrained="", vit_kwargs=tiny_vit_kwargs(),
             image_size=IMAGE, bert=bert, num_query_tokens=8, cross_attention_freq=2, hidden_size=HIDDEN, num_layers=2,
             num_heads=4, intermediate_size=128, max_position_embeddings=64, dropout=0.0, embed_dim=32, max_txt_len=16)
    c.update(overrides)
    return OurConfig(**c)
