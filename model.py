"""
BLIP-2 (Li et al., 2023) with P-Former (Jian et al., NeurIPS 2023), in one file.

Read top to bottom:
  1. config
  2. collectives (all-gather with / without gradient) that work on one process and across DDP ranks
  3. the frozen image encoder (timm ViT) and the frozen LLM (any Hugging Face causal LM, or FlanT5)
  4. the Q-Former: BERT attention and feed-forward blocks, the Q-Former layer, the Q-Former with its
     32 learned queries and three attention regimes, and BERT's LM head for ITG
  5. Blip2Stage1: image encoder + Q-Former with the ITC, ITM and ITG losses
  6. Blip2Stage2: image encoder + Q-Former + LLM with the LM loss and generation
  7. P-Former: the prompt predictor trained on text alone (stage 0), and the alignment loss of stages 1 and 2
  8. loading weights: bert-base-uncased into the Q-Former, official BLIP-2 checkpoints in
     Hugging Face format (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval) into stages 2 and 1

Shapes in comments use B = batch, Q = 32 queries, T = text length, N = 257 image tokens, D = 768 (Q-Former).
"""

import inspect
import math
import re
from dataclasses import dataclass, field, fields, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# -----------------------------------------------------------------------------
# 1. config


@dataclass
class Blip2Config:
    # frozen image encoder, built by timm
    vit_model: str = "eva_giant_patch14_clip_224"  # or "vit_large_patch14_clip_quickgelu_224", or any timm ViT
    vit_layers: int = 39  # blocks kept: BLIP-2 reads the second-to-last block (EVA-g 40 -> 39, CLIP-L 24 -> 23)
    vit_pretrained: str = "timm"  # "timm": timm's own pretrained weights; a path: a timm checkpoint; "": random
    vit_kwargs: dict = field(default_factory=dict)  # timm.create_model overrides, for small encoders
    vit_dtype: str = "float32"  # frozen weights; float16 on GPU as in the paper
    image_size: int = 224
    ln_vision_eps: float = 1e-5
    # Q-Former (BERT-base sizes) and its text tokenizer
    bert: str = "bert-base-uncased"  # Hugging Face BERT (name or directory) for the tokenizer and the init
    qformer_init_from_bert: bool = True  # False: random init (tests, benchmarks)
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30523  # bert-base-uncased 30522 + [DEC]
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    embed_dim: int = 256  # ITC projection
    max_txt_len: int = 32  # Q-Former text and LLM text, in tokens
    # frozen LLM (stage 2)
    llm_model: str = "facebook/opt-2.7b"  # Hugging Face causal LM or FlanT5 (name or directory)
    llm_dtype: str = "float32"  # frozen weights; float16 (OPT) / bfloat16 (FlanT5) on GPU
    prompt: str = ""  # text prompt before the caption in stage 2 (e.g. "a photo of")
    t5_prefix_split: bool = False  # FlanT5: split each caption at a random word into encoder prefix / target
    # P-Former
    mask_rate: float = 0.25  # stage 0: BERT input tokens replaced by [MASK]
    align_weight: float = 10.0  # stages 1 and 2 with a P-Former: 10 in stage 1, 100 in stage 2

    @classmethod
    def pick(cls, config):
        """The Blip2Config named by the keys of a training script's config that are Blip2Config fields."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


# -----------------------------------------------------------------------------
# 2. collectives: identical results on 1 process and on N ranks


def _world():
    """(rank, world_size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_no_grad(x):
    """Concatenate `x` over ranks along dim 0, detached. The method's `concat_all_gather`.
    Detached on one process too, so that the loss and its gradient do not depend on the world size."""
    rank, world = _world()
    x = x.detach()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of every rank's copy and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        rank, world = _world()
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        rank, world = _world()
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world)[rank]


def gather_with_grad(x):
    """Concatenate `x` over ranks along dim 0, keeping the gradient (ITM's hard-negative images)."""
    return x if _world()[1] == 1 else _GatherWithGrad.apply(x)


# -----------------------------------------------------------------------------
# 3. frozen backbones


def freeze(module):
    module.requires_grad_(False)
    module.eval()
    return module


class Frozen(nn.Module):
    """A module that stays in eval mode whatever its parent's train() says (dropout and drop-path off)."""

    def train(self, mode=True):
        return super().train(False)


class FrozenViT(Frozen):
    """The frozen image encoder: a timm ViT truncated to `vit_layers` blocks, final norm removed.
    image B x 3 x 224 x 224 -> B x 257 x 1408 (EVA ViT-g/14), CLS token included.
    Frozen and in eval mode for good; weights in half precision on GPU, LayerNorms in fp32."""

    def __init__(self, config):
        super().__init__()
        import timm

        name = config.vit_model
        if not timm.is_model(name.split(".")[0]):
            raise ValueError(f"unknown image encoder '{name}': not a timm model name")
        kwargs = dict(num_classes=0, img_size=config.image_size, **config.vit_kwargs)
        if config.vit_pretrained == "timm":
            kwargs.update(pretrained=True)
        elif config.vit_pretrained:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=config.vit_pretrained))
        try:
            vit = timm.create_model(name, **kwargs)
        except (OSError, RuntimeError) as e:
            raise RuntimeError(f"cannot load the weights of image encoder '{name}' "
                               f"(vit_pretrained={config.vit_pretrained!r}): {str(e).splitlines()[0]}") from None
        depth = len(vit.blocks)
        if not 0 < config.vit_layers <= depth:
            raise ValueError(f"vit_layers={config.vit_layers} but '{name}' has {depth} blocks")
        vit.blocks = vit.blocks[: config.vit_layers]
        vit.norm = nn.Identity()  # BLIP-2 uses the raw output of the last kept block
        dtype = DTYPES[config.vit_dtype]
        for m in vit.modules():  # half-precision weights, but LayerNorm parameters stay fp32
            if not isinstance(m, nn.LayerNorm):
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(dtype)
        self.vit = freeze(vit)
        self.dtype = dtype
        self.image_size = config.image_size
        self.width = vit.num_features
        self.num_tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens  # 257 for ViT-g/14 at 224 px

    @torch.no_grad()
    def forward(self, image):
        """image: B x 3 x S x S -> B x N x width. Features this encoder computed earlier (B x N x width) pass
        through unchanged: a run without augmentation can precompute them once and skip the encoder (speed)."""
        if image.ndim == 3 and tuple(image.shape[1:]) == (self.num_tokens, self.width):
            return image
        S = self.image_size
        if image.ndim != 4 or tuple(image.shape[1:]) != (3, S, S):
            raise ValueError(f"expected images of shape B x 3 x {S} x {S}, got {tuple(image.shape)}")
        half = self.dtype != torch.float32
        with torch.autocast(image.device.type, dtype=self.dtype, enabled=half):  # LayerNorm runs in fp32
            return self.vit.forward_features(image.to(self.dtype))  # B x N x 1408


def _load_pretrained(loader, name, what, **kwargs):
    """from_pretrained with a one-line error naming what could not be loaded."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load {what} '{name}': not a local directory with a model, and not "
                         f"available from the Hugging Face Hub ({str(e).splitlines()[0][:200]})") from None


def newline_token_id(tokenizer):
    """The id of "\\n", which ends every caption in stage 2 and stops generation (OPT: 50118)."""
    return tokenizer("\n", add_special_tokens=False).input_ids[-1]  # SentencePiece may put "▁" first


class FrozenLLM(Frozen):
    """The frozen language model, driven through `inputs_embeds` by a soft prompt (B x Q x d_LLM) in front of
    its text: any Hugging Face decoder-only causal LM (OPT, Llama-family such as SmolLM2 or Qwen) or an
    encoder-decoder FlanT5. Frozen and in eval mode for good. `prompt`: a text prompt after the soft prompt
    (e.g. "a photo of"); `max_txt_len`: text tokens kept; `t5_prefix_split`: see split_captions."""

    def __init__(self, hf_model, tokenizer, prompt="", max_txt_len=32, t5_prefix_split=False):
        super().__init__()
        self.model = freeze(hf_model)
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:  # Llama-family tokenizers have none; padding is masked out anyway
            tokenizer.pad_token = tokenizer.eos_token
        self.is_encoder_decoder = bool(hf_model.config.is_encoder_decoder)
        self.eos_token_id = tokenizer.eos_token_id if self.is_encoder_decoder else newline_token_id(tokenizer)
        self.dim = hf_model.get_input_embeddings().embedding_dim
        # HF causal LMs that take `logits_to_keep` (OPT, Llama, Qwen2, ...) compute the LM head on chosen positions
        self._keeps_logits = "logits_to_keep" in inspect.signature(hf_model.forward).parameters
        self.prompt, self.max_txt_len, self.t5_prefix_split = prompt, max_txt_len, t5_prefix_split

    @classmethod
    def from_pretrained(cls, name, dtype="float32", **options):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        config = _load_pretrained(AutoConfig, name, "LLM")
        loader = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = _load_pretrained(loader, name, "LLM", dtype=DTYPES[dtype])
        return cls(model, _load_pretrained(AutoTokenizer, name, "LLM tokenizer"), **options)

    def embed(self, ids):
        return self.model.get_input_embeddings()(ids)

    def tokenize(self, texts, padding_side="right", max_length=None):
        self.tokenizer.padding_side = padding_side
        return self.tokenizer(texts, padding="longest", truncation=max_length is not None, max_length=max_length,
                              return_tensors="pt")

    def with_soft_prompt(self, prompt_embeds, tokens):
        """[soft prompt (Q); embedded tokens] and its attention mask [1] * Q + the tokens' mask."""
        tokens = tokens.to(prompt_embeds.device)
        embeds = torch.cat([prompt_embeds.to(self.model.dtype), self.embed(tokens.input_ids)], dim=1)
        mask = torch.cat([tokens.attention_mask.new_ones(prompt_embeds.shape[:2]), tokens.attention_mask], dim=1)
        return embeds, mask

    def inputs(self, prompt_embeds, texts):
        """The LLM's inputs for the LM loss of `texts` after the soft prompt, as keyword arguments of its forward.
        Decoder-only: [soft prompt (Q); BOS + text prompt + text + "\n"], right-padded to the longest (at most
        max_txt_len tokens); labels -100 on the soft prompt, the padding and a non-empty text prompt.
        FlanT5: the encoder reads [soft prompt; prefix], the decoder's labels are the rest of the text."""
        if self.is_encoder_decoder:
            prefixes, targets = split_captions(texts, self.prompt, self.t5_prefix_split)
            embeds, attn = self.with_soft_prompt(prompt_embeds, self.tokenize(prefixes, max_length=self.max_txt_len))
            dec = self.tokenize(targets, max_length=self.max_txt_len).to(embeds.device)
            labels = dec.input_ids.masked_fill(dec.attention_mask == 0, -100)
            return dict(inputs_embeds=embeds, attention_mask=attn, labels=labels,
                        decoder_attention_mask=dec.attention_mask)
        t = self.tokenize([self.prompt + text + "\n" for text in texts], max_length=self.max_txt_len)
        embeds, attn = self.with_soft_prompt(prompt_embeds, t)
        labels = t.input_ids.to(embeds.device).masked_fill(attn[:, prompt_embeds.shape[1]:] == 0, -100)
        if self.prompt:  # the text prompt (and BOS) are given, not predicted
            labels[:, : len(self.tokenizer(self.prompt).input_ids)] = -100
        labels = torch.cat([labels.new_full(prompt_embeds.shape[:2], -100), labels], dim=1)
        return dict(inputs_embeds=embeds, attention_mask=attn, labels=labels)

    def lm_loss(self, prompt_embeds, texts):
        """The LM loss of `texts` after the soft prompt: token-level cross-entropy, mean over the batch's targets."""
        inputs = self.inputs(prompt_embeds, texts)
        if self.is_encoder_decoder:
            return self.model(**inputs).loss
        labels = inputs.pop("labels")
        Q, L = prompt_embeds.shape[1], labels.shape[1]
        if self._keeps_logits:
            # speed: the LM head (d_LLM x V) and the softmax only where a text token is predicted, positions
            # Q-1 .. L-2 (the soft prompt's own positions predict nothing): B x T x V instead of B x (Q + T) x V.
            # No KV cache either: nothing is generated.
            keep = torch.arange(Q - 1, L - 1, device=labels.device)
            logits = self.model(**inputs, logits_to_keep=keep, use_cache=False).logits  # B x T x V
            return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, Q:].flatten(), ignore_index=-100)
        logits = self.model(**inputs).logits  # B x (Q + T) x V
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

    @torch.no_grad()
    def generate_tokens(self, prompt_embeds, prompt=None, num_beams=5, max_new_tokens=30, min_new_tokens=1,
                        length_penalty=1.0, **kwargs):
        """Token ids generated after a soft prompt and a text prompt (one string, or one per row; default
        self.prompt): greedy (num_beams=1) or beam search. Decoder-only models stop at "\n", T5 at </s>."""
        prompt = self.prompt if prompt is None else prompt
        prompts = [prompt] * prompt_embeds.shape[0] if isinstance(prompt, str) else list(prompt)
        # decoder-only: left padding keeps every text prompt right next to the text generated after it
        t = self.tokenize(prompts, padding_side="right" if self.is_encoder_decoder else "left")
        embeds, attn = self.with_soft_prompt(prompt_embeds, t)
        return self.model.generate(inputs_embeds=embeds, attention_mask=attn, num_beams=num_beams,
                                   max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                   length_penalty=length_penalty, eos_token_id=self.eos_token_id,
                                   pad_token_id=self.tokenizer.pad_token_id, do_sample=False, **kwargs)

    def decode(self, tokens):
        return [s.strip() for s in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


# -----------------------------------------------------------------------------
# 4. the Q-Former


class Attention(nn.Module):
    """BERT attention block, post-LN: LN(x + Dropout(Dense(MultiHead(x -> context)))).
    Self-attention when `context` is None, cross-attention to the image features otherwise."""

    def __init__(self, hidden, heads, dropout, eps, context_dim=None):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context_dim or hidden, hidden)
        self.value = nn.Linear(context_dim or hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = dropout

    def _heads(self, x):  # B x L x D -> B x H x L x D/H
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x, context=None, mask=None, past_kv=None):
        """mask: boolean, True = may attend, broadcastable to B x H x L x L_kv. past_kv: cached (k, v) of
        the queries, prepended to this pass's keys and values (ITG). Returns (output, (k, v))."""
        context = x if context is None else context
        q, k, v = self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(x.shape)
        return self.norm(x + F.dropout(self.out(y), p, self.training)), (k, v)


class FeedForward(nn.Module):
    """BERT feed-forward block, post-LN: LN(x + Dropout(W2 GELU(W1 x)))."""

    def __init__(self, hidden, intermediate, dropout, eps):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = dropout

    def forward(self, x):
        return self.norm(x + F.dropout(self.fc2(F.gelu(self.fc1(x))), self.dropout, self.training))


class QFormerLayer(nn.Module):
    """One Q-Former layer on h = [queries (Q); text (T)]: self-attention shared by queries and text,
    cross-attention to the image for the queries (every `cross_attention_freq` layers), and separate
    feed-forward blocks for queries (`ffn_query`) and text (`ffn_text`)."""

    def __init__(self, c, cross_attention, with_queries=True, with_text=True, image_dim=None):
        super().__init__()
        D, args = c.hidden_size, (c.num_heads, c.dropout, c.layer_norm_eps)
        self.self_attn = Attention(D, *args)
        self.cross_attn = Attention(D, *args, context_dim=image_dim) if cross_attention else None
        self.ffn_query = FeedForward(D, c.intermediate_size, c.dropout, c.layer_norm_eps) if with_queries else None
        self.ffn_text = FeedForward(D, c.intermediate_size, c.dropout, c.layer_norm_eps) if with_text else None

    def forward(self, h, n_query, mask=None, image=None, past_kv=None):
        a, kv = self.self_attn(h, mask=mask, past_kv=past_kv)
        queries, text = a[:, :n_query], a[:, n_query:]
        parts = []
        if n_query:
            if self.cross_attn is not None:
                queries = self.cross_attn(queries, context=image)[0]
            parts.append(self.ffn_query(queries))
        if text.shape[1]:
            parts.append(self.ffn_text(text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0], kv


class QFormer(nn.Module):
    """The Querying Transformer: BERT-base whose layers also carry Q learned query tokens that read the
    frozen image features through cross-attention. Three ways to run it, one per attention regime:
      encode_queries: queries alone, with cross-attention                     (ITC image side; stage 2)
      encode_text:    text alone, bidirectional                               (ITC text side; P-Former)
      encode_joint:   queries + text, everything sees everything             (ITM)
      decode_text:    text over the cached query states, causal over text    (ITG)
    With `with_text=False` (stage 2) the text embeddings and text feed-forward blocks are not built;
    with `num_query_tokens=0` (P-Former) neither are the queries, their FFNs, nor cross-attention."""

    def __init__(self, c, image_dim=None, with_text=True):
        super().__init__()
        self.config = c
        D = c.hidden_size
        with_queries = c.num_query_tokens > 0
        if with_queries:
            self.query_tokens = nn.Parameter(torch.randn(1, c.num_query_tokens, D) * 0.02)
        if with_text:
            self.word_embeddings = nn.Embedding(c.vocab_size, D, padding_idx=0)
            self.position_embeddings = nn.Embedding(c.max_position_embeddings, D)
        self.embed_norm = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(c, with_queries and i % c.cross_attention_freq == 0, with_queries, with_text, image_dim)
            for i in range(c.num_layers))
        self.apply(_init_bert_weights)

    def embed(self, ids=None, with_queries=False, batch_size=None):
        """[queries; word + position embeddings of the text] -> LayerNorm -> dropout. B x (Q + T) x D."""
        parts = []
        if with_queries:
            parts.append(self.query_tokens.expand(batch_size if ids is None else ids.shape[0], -1, -1))
        if ids is not None:
            pos = torch.arange(ids.shape[1], device=ids.device)
            parts.append(self.word_embeddings(ids) + self.position_embeddings(pos))
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return F.dropout(self.embed_norm(h), self.config.dropout, self.training)

    def _run(self, h, n_query, mask=None, image=None, past_kvs=None):
        kvs = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, n_query, mask, image, None if past_kvs is None else past_kvs[i])
            kvs.append(kv)
        return h, kvs

    def encode_queries(self, image_embeds):
        """Queries read the image: B x N x 1408 -> Z: B x Q x D, plus each layer's (k, v) for ITG."""
        h = self.embed(with_queries=True, batch_size=image_embeds.shape[0])
        return self._run(h, h.shape[1], image=image_embeds)

    def encode_text(self, ids, mask):
        """Text alone, bidirectional; padding hidden. B x T -> B x T x D ([CLS] feature at position 0)."""
        return self._run(self.embed(ids), 0, mask=mask[:, None, None, :].bool())[0]

    def encode_joint(self, image_embeds, ids, mask):
        """ITM: queries and text see each other (padding hidden); queries also read the image. B x (Q+T) x D."""
        h = self.embed(ids, with_queries=True)
        Q = h.shape[1] - ids.shape[1]
        keys = torch.cat([mask.new_ones(mask.shape[0], Q), mask], dim=1)
        return self._run(h, Q, mask=keys[:, None, None, :].bool(), image=image_embeds)[0]

    def decode_text(self, ids, mask, query_kvs):
        """ITG: text token j sees all Q queries (through their cached keys/values from encode_queries)
        and text tokens <= j; queries never see text. B x T -> B x T x D."""
        T, Q = ids.shape[1], query_kvs[0][0].shape[2]
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        allowed = torch.cat([causal.new_ones(T, Q), causal], dim=1)  # T x (Q + T)
        keys = torch.cat([mask.new_ones(mask.shape[0], Q), mask], dim=1).bool()
        return self._run(self.embed(ids), 0, mask=allowed[None, None] & keys[:, None, None, :],
                         past_kvs=query_kvs)[0]


class LMHead(nn.Module):
    """BERT's MLM head, used for ITG: Dense -> GELU -> LayerNorm -> decoder tied to the word embeddings + bias."""

    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))
        self.apply(_init_bert_weights)

    def forward(self, h, word_embeddings):
        return F.linear(self.norm(F.gelu(self.dense(h))), word_embeddings, self.bias)


def _init_bert_weights(m):
    """BERT init for everything new (cross-attention, heads, and all of a randomly initialised Q-Former)."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Embedding) and m.padding_idx is not None:
        nn.init.zeros_(m.weight[m.padding_idx])
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def load_qformer_tokenizer(bert):
    """BERT's WordPiece tokenizer plus the [DEC] token that starts ITG decoding (id 30522 for bert-base)."""
    from transformers import AutoTokenizer

    tok = bert if not isinstance(bert, str) else _load_pretrained(AutoTokenizer, bert, "BERT tokenizer")
    if tok.bos_token != "[DEC]":
        tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


# -----------------------------------------------------------------------------
# 5. stage 1: representation learning with ITC + ITM + ITG


def _check_vocab(config, tokenizer):
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the Q-Former tokenizer has {len(tokenizer)} tokens (with [DEC]) but "
                         f"vocab_size={config.vocab_size}")


class Blip2Stage1(nn.Module):
    """BLIP-2 stage 1: frozen image encoder -> trainable `ln_vision` -> Q-Former, trained with
    ITC (image-text contrastive), ITM (image-text matching with hard negatives) and ITG (image-grounded
    text generation). `loss = itc + itm + itg`."""

    def __init__(self, config, tokenizer=None, vit=None, pformer=None):
        super().__init__()
        self.config = c = config
        self.visual = vit if vit is not None else FrozenViT(c)
        self.ln_vision = nn.LayerNorm(self.visual.width, eps=c.ln_vision_eps)
        self.qformer = QFormer(c, image_dim=self.visual.width)
        # with a P-Former, stage 1 also learns llm_proj (carried into stage 2) by the alignment loss
        self.pformer = FrozenPFormer(pformer, c.num_query_tokens) if pformer is not None else None
        self.llm_proj = nn.Linear(c.hidden_size, pformer.llm_dim) if pformer is not None else None
        self.vision_proj = nn.Linear(c.hidden_size, c.embed_dim)
        self.text_proj = nn.Linear(c.hidden_size, c.embed_dim)
        self.itm_head = nn.Linear(c.hidden_size, 2)
        self.itg_head = LMHead(c)
        self.temp = nn.Parameter(torch.tensor(0.07))  # not clamped, as in the official code
        for m in (self.vision_proj, self.text_proj, self.itm_head, self.llm_proj):
            if m is not None:
                _init_bert_weights(m)
        self.tokenizer = load_qformer_tokenizer(tokenizer if tokenizer is not None else c.bert)
        _check_vocab(c, self.tokenizer)
        self.dec_token_id = self.tokenizer.bos_token_id
        if c.qformer_init_from_bert:
            init_from_bert(self, c.bert)

    # -- features, shared by the losses and by retrieval evaluation

    def image_embeds(self, image):
        """ln_vision(frozen ViT(image)): B x N x 1408, gradient only through ln_vision."""
        return self.ln_vision(self.visual(image))

    def tokenize(self, captions, device):
        """[CLS] caption [SEP], at most max_txt_len tokens, right-padded. Padding is hidden from every pass and
        every loss, so on one process the batch is padded only to its longest caption (less work, same losses);
        under DDP to max_txt_len, as LAVIS does, because ITM gathers the ids of all ranks into one tensor."""
        padding = "max_length" if _world()[1] > 1 else "longest"
        t = self.tokenizer(captions, padding=padding, truncation=True, max_length=self.config.max_txt_len,
                           return_tensors="pt")
        return t.input_ids.to(device, non_blocking=True), t.attention_mask.to(device, non_blocking=True)

    def image_feats(self, Z):
        """ITC image side: normalised projections of the Q query outputs Z (B x Q x D), B x Q x 256."""
        return F.normalize(self.vision_proj(Z), dim=-1)

    def text_feats(self, ids, mask):
        """ITC text side: normalised projection of the [CLS] output of the text-only pass, B x 256."""
        return F.normalize(self.text_proj(self.qformer.encode_text(ids, mask)[:, 0]), dim=-1)

    def itm_logits(self, image_embeds, ids, mask):
        """ITM: mean over the Q query outputs of the joint pass of itm_head, B x 2 (class 1 = match)."""
        out = self.qformer.encode_joint(image_embeds, ids, mask)
        return self.itm_head(out[:, : self.config.num_query_tokens]).mean(1)

    @staticmethod
    def similarity(img_feats, txt_feats):
        """ITC similarity: max over the Q queries of cosine(query feature, text feature). n_img x n_txt."""
        return torch.einsum("iqd,td->itq", img_feats, txt_feats).max(-1).values

    # -- the three losses

    def forward(self, image, captions, neg_generator=None):
        """image: B x 3 x 224 x 224, captions: B strings. `neg_generator` (same seed on every rank) makes the
        ITM negatives independent of the number of ranks. Returns the losses as a dict."""
        ids, mask = self.tokenize(captions, image.device)
        image_embeds = self.image_embeds(image)  # B x N x 1408
        Z, query_kvs = self.qformer.encode_queries(image_embeds)  # B x Q x D, each layer's query (k, v)
        img = self.image_feats(Z)  # B x Q x 256
        txt = self.text_feats(ids, mask)  # B x 256
        itc, sim_i2t, sim_t2i = self.itc_loss(img, txt)
        itm = self.itm_loss(image_embeds, ids, mask, sim_i2t, sim_t2i, neg_generator)
        itg = self.itg_loss(ids, mask, query_kvs)
        losses = dict(loss=itc + itm + itg, itc=itc, itm=itm, itg=itg)
        if self.pformer is not None:
            losses["align"] = self.pformer.align_loss(self.llm_proj(Z), captions)
            losses["loss"] = losses["loss"] + self.config.align_weight * losses["align"]
        return losses

    def itc_loss(self, img, txt):
        """ITC: similarity = max over the Q queries; both sides gathered from all ranks without gradient;
        targets are each rank's own pairs; symmetric cross-entropy with label smoothing 0.1."""
        rank, _ = _world()
        img_all, txt_all = gather_no_grad(img), gather_no_grad(txt)  # (B * world) x ...
        sim_i2t = self.similarity(img, txt_all) / self.temp  # B x (B * world)
        sim_t2i = self.similarity(img_all, txt).t() / self.temp  # B x (B * world)
        targets = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
        loss = (F.cross_entropy(sim_i2t.float(), targets, label_smoothing=0.1)
                + F.cross_entropy(sim_t2i.float(), targets, label_smoothing=0.1)) / 2
        return loss, sim_i2t, sim_t2i

    def itm_loss(self, image_embeds, ids, mask, sim_i2t, sim_t2i, generator=None):
        """ITM: for each text one negative image, for each image one negative text, drawn from the softmax of
        the ITC similarities over the whole global batch with the positives masked out; the negative images
        carry gradient. 3B pairs: (text, image), (text, negative image), (negative text, image)."""
        rank, _ = _world()
        B = ids.shape[0]
        image_all = gather_with_grad(image_embeds)  # (B * world) x N x 1408
        ids_all, mask_all = gather_no_grad(ids), gather_no_grad(mask)
        with torch.no_grad():
            # Exp(1) noise for the whole global batch, same on every rank when `generator` is seeded alike;
            # this rank takes its rows, so the draw does not depend on the number of ranks
            n = sim_t2i.shape[1]
            noise = torch.empty(2, n, n, device=ids.device).exponential_(generator=generator)
            noise = noise[:, rank * B: rank * B + B]
            own = torch.arange(B, device=ids.device) + rank * B
            neg_image = sample_negatives(sim_t2i, own, noise[0])  # B indices into the global batch
            neg_text = sample_negatives(sim_i2t, own, noise[1])
        ids_itm = torch.cat([ids, ids, ids_all[neg_text]])
        mask_itm = torch.cat([mask, mask, mask_all[neg_text]])
        image_itm = torch.cat([image_embeds, image_all[neg_image], image_embeds])
        logits = self.itm_logits(image_itm, ids_itm, mask_itm)  # 3B x 2
        labels = torch.cat([ids.new_ones(B), ids.new_zeros(2 * B)])
        return F.cross_entropy(logits.float(), labels)

    def itg_loss(self, ids, mask, query_kvs):
        """ITG: [CLS] -> [DEC]; each text token predicts the next from the queries and the text before it;
        shifted cross-entropy with label smoothing 0.1, padding ignored."""
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.dec_token_id
        h = self.qformer.decode_text(dec_ids, mask, query_kvs)  # B x T x D
        logits = self.itg_head(h[:, :-1], self.qformer.word_embeddings.weight)
        labels = dec_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               label_smoothing=0.1)


def sample_negatives(sim, own, noise):
    """One index per row drawn from softmax(sim) with the row's positive (`own`) masked out, as
    torch.multinomial would, without a Python loop. Gumbel-max trick: argmax(sim - log E), E ~ Exp(1)."""
    sim = sim.float().scatter(1, own[:, None], -10000.0)  # the official code's fill_diagonal_(-10000)
    return (sim - noise.clamp_min(1e-30).log()).argmax(1)


# -----------------------------------------------------------------------------
# 6. stage 2: generative learning through the frozen LLM


class Blip2Stage2(nn.Module):
    """BLIP-2 stage 2: frozen image encoder -> ln_vision -> Q-Former (queries only) -> `llm_proj` ->
    a soft prompt of Q vectors in front of the frozen LLM's input embeddings, trained with the LM loss."""

    def __init__(self, config, llm=None, vit=None, pformer=None):
        super().__init__()
        self.config = c = config
        self.visual = vit if vit is not None else FrozenViT(c)
        self.ln_vision = nn.LayerNorm(self.visual.width, eps=c.ln_vision_eps)
        self.qformer = QFormer(c, image_dim=self.visual.width, with_text=False)
        self.llm = llm if llm is not None else FrozenLLM.from_pretrained(
            c.llm_model, c.llm_dtype, prompt=c.prompt, max_txt_len=c.max_txt_len, t5_prefix_split=c.t5_prefix_split)
        self.llm_proj = nn.Linear(c.hidden_size, self.llm.dim)
        _init_bert_weights(self.llm_proj)
        self.pformer = FrozenPFormer(pformer, c.num_query_tokens) if pformer is not None else None
        if pformer is not None and pformer.llm_dim != self.llm.dim:
            raise ValueError(f"the P-Former predicts prompts of width {pformer.llm_dim}, the LLM takes {self.llm.dim}")

    def load_stage1(self, state_dict, source):
        """Start from stage 1's trainable weights: ln_vision and the Q-Former's query path (and llm_proj when
        stage 1 trained one for P-Former alignment); stage 1's text-only parts and heads are left behind."""
        ours = {n for n, p in self.named_parameters() if p.requires_grad}
        carried = {k: v for k, v in state_dict.items() if k in ours}
        missing = sorted(ours - set(carried) - {"llm_proj.weight", "llm_proj.bias"})
        if missing or "qformer.query_tokens" not in state_dict:
            raise ValueError(f"{source} is not a stage-1 checkpoint of this model: it lacks "
                             f"{', '.join(missing[:5]) or 'qformer.query_tokens'}")
        _copy_weights(self, carried, source, "stage-1 weights")

    def soft_prompt(self, image):
        """image -> llm_proj(Q-Former query outputs): B x Q x d_LLM."""
        Z, _ = self.qformer.encode_queries(self.ln_vision(self.visual(image)))
        return self.llm_proj(Z)

    def forward(self, image, captions):
        """LM loss of the captions given the image: {"loss", "lm"} (+ "align" with a P-Former)."""
        prompt = self.soft_prompt(image)
        lm = self.llm.lm_loss(prompt, captions)
        if self.pformer is None:
            return dict(loss=lm, lm=lm)
        align = self.pformer.align_loss(prompt, captions)
        return dict(loss=lm + self.config.align_weight * align, lm=lm, align=align)

    @torch.no_grad()
    def generate(self, image, prompt=None, **kwargs):
        """Captions or answers for a batch of images: greedy (num_beams=1) or beam search. `prompt`: one string
        for all images or one per image (e.g. "Question: what is it? Short answer:"); default config.prompt.
        Keyword arguments as FrozenLLM.generate_tokens."""
        return self.llm.decode(self.llm.generate_tokens(self.soft_prompt(image), prompt, **kwargs))


def split_captions(captions, prompt="", random_split=False):
    """(encoder prefixes, decoder targets) for FlanT5. Default as the released code: prefix = the prompt.
    With `random_split` as the paper: cut each caption after k words, k uniform in [0, n-1], so the target is
    never empty and a one-word caption is all target (the official randint(1, n // 2) crashes on those)."""
    if not random_split:
        return [prompt] * len(captions), list(captions)
    prefixes, targets = [], []
    for cap in captions:
        words = cap.split()
        k = int(torch.randint(len(words), ())) if words else 0
        prefixes.append(" ".join(words[:k]))
        targets.append(" ".join(words[k:]))
    return prefixes, targets


# -----------------------------------------------------------------------------
# 7. P-Former


class PFormer(nn.Module):
    """The prompt predictor: a BERT encoder (the Q-Former's blocks, without queries and cross-attention) whose
    last-layer [CLS] predicts the soft prompt that makes the frozen LLM reproduce the sentence:
    [CLS] -> cls_proj -> Q prompt vectors -> Linear + Tanh -> llm_proj -> B x Q x d_LLM, the "ideal prompt".
    Plus text_proj and temp for the contrastive term of stage 0."""

    def __init__(self, config, llm_dim, tokenizer=None):
        super().__init__()
        c = self.config = config
        self.tokenizer = load_qformer_tokenizer(tokenizer if tokenizer is not None else c.bert)
        self.encoder = QFormer(replace(c, num_query_tokens=0))
        self.num_prompts, self.llm_dim = c.num_query_tokens, llm_dim
        self.cls_proj = nn.Linear(c.hidden_size, c.num_query_tokens * c.hidden_size)
        self.prompt_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.llm_proj = nn.Linear(c.hidden_size, llm_dim)
        self.text_proj = nn.Linear(c.hidden_size, c.embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        for m in (self.cls_proj, self.prompt_proj, self.llm_proj, self.text_proj):
            _init_bert_weights(m)
        if c.qformer_init_from_bert:
            sd, source = _bert_state_dict(c.bert)
            _copy_weights(self, bert_to_qformer(sd, self.encoder, prefix="encoder."), source, "BERT weights")

    def tokenize(self, texts, device):
        """BERT tokens of text + "\n" (the LLM's target; BERT reads the newline as a space), at most max_txt_len."""
        t = self.tokenizer([text + "\n" for text in texts], padding="longest", truncation=True,
                           max_length=self.config.max_txt_len, return_tensors="pt")
        return t.input_ids.to(device, non_blocking=True), t.attention_mask.to(device, non_blocking=True)

    def forward(self, ids, mask):
        """-> (prompts B x Q x d_LLM, [CLS] output B x D). The prompt count is num_query_tokens, whatever the
        text length (the official code reshapes by the text length, right only when both are 32)."""
        cls = self.encoder.encode_text(ids, mask)[:, 0]
        prompts = self.cls_proj(cls).view(ids.shape[0], self.num_prompts, -1)  # B x Q x D
        return self.llm_proj(torch.tanh(self.prompt_proj(prompts))), cls

    def contrastive_loss(self, cls):
        """Stage 0's loss_c: each sentence against all sentences of the global batch (gathered without gradient),
        one view, target = itself; cross-entropy with label smoothing 0.1."""
        rank, _ = _world()
        f = F.normalize(self.text_proj(cls), dim=-1)  # B x 256
        sim = f @ gather_no_grad(f).t() / self.temp  # B x (B * world)
        targets = torch.arange(f.shape[0], device=f.device) + rank * f.shape[0]
        return F.cross_entropy(sim.float(), targets, label_smoothing=0.1)

    @classmethod
    def from_checkpoint(cls, state, source):
        """The P-Former of a stage-0 checkpoint (train_pformer.py). Every weight must be there, under the
        expected name and shape: a mismatch fails here instead of aligning to a half-random P-Former."""
        config = replace(Blip2Config.pick(state["config"]), qformer_init_from_bert=False)
        weights = {k.removeprefix("pformer."): v for k, v in state["model"].items() if k.startswith("pformer.")}
        if "llm_proj.weight" not in weights:
            raise ValueError(f"{source} is not a P-Former checkpoint: no pformer.llm_proj.weight")
        pformer = cls(config, weights["llm_proj.weight"].shape[0])
        missing = sorted(set(dict(pformer.named_parameters())) - set(weights))
        if missing:
            raise ValueError(f"{source}: P-Former weights missing: {', '.join(missing[:5])}")
        _copy_weights(pformer, weights, source, "P-Former weights")
        return pformer


class FrozenPFormer(Frozen):
    """A trained P-Former as the teacher of stages 1 and 2: frozen, in eval mode for good, never masked.
    loss_align = MSE(llm_proj(Z), P-Former(caption + "\n")), element-wise mean, no normalisation."""

    def __init__(self, pformer, num_query_tokens):
        super().__init__()
        if pformer.num_prompts != num_query_tokens:
            raise ValueError(f"the P-Former predicts {pformer.num_prompts} prompt vectors, "
                             f"the Q-Former has {num_query_tokens} queries")
        self.pformer = freeze(pformer)
        self.llm_dim = pformer.llm_dim

    @torch.no_grad()
    def target(self, captions, device):
        return self.pformer(*self.pformer.tokenize(captions, device))[0]  # B x Q x d_LLM

    def align_loss(self, prompts, captions):
        return F.mse_loss(prompts.float(), self.target(captions, prompts.device).float())


def mask_tokens(ids, mask, mask_token_id, rate, generator=None):
    """P-Former's input masking: each real token except [CLS] becomes [MASK] with probability `rate`
    ([PAD] never; the LLM still has to reproduce the clean sentence)."""
    draw = torch.rand(ids.shape, device=ids.device, generator=generator) < rate
    maskable = mask.bool() & (torch.arange(ids.shape[1], device=ids.device) > 0)
    return ids.masked_fill(draw & maskable, mask_token_id)


def nearest_embeddings(x, table, chunk=8192):
    """Index of the nearest row of `table` (V x d) for each row of x (N x d), in L2 distance, computed chunk
    by chunk of the vocabulary in fp32: ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2 with ||x||^2 dropped.
    Memory N x chunk; no N x V one-hot (the official code's dense matmul costs ~2 TFLOP a step)."""
    x = x.float()
    best = torch.full((x.shape[0],), float("inf"), device=x.device)
    index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, table.shape[0], chunk):
            e = table[start: start + chunk].float()
            dist = e.square().sum(1) - 2 * x @ e.t()  # N x chunk
            value, arg = dist.min(1)
            better = value < best
            best = torch.where(better, value, best)
            index = torch.where(better, arg + start, index)
    return index


class PFormerStage0(nn.Module):
    """P-Former pre-training on text alone: from a (25% masked) sentence, predict a soft prompt that makes
    the frozen LLM reproduce the clean sentence. loss = loss_c (contrastive, pushes sentences apart)
    + loss_vq (commitment of each prompt vector to its nearest LLM token embedding) + loss_lm.
    With FlanT5: no masking and no VQ; the LLM's t5_prefix_split decides the prefix / target split."""

    def __init__(self, config, llm=None):
        super().__init__()
        c = self.config = config
        self.llm = llm if llm is not None else FrozenLLM.from_pretrained(
            c.llm_model, c.llm_dtype, prompt=c.prompt, max_txt_len=c.max_txt_len, t5_prefix_split=c.t5_prefix_split)
        self.pformer = PFormer(c, self.llm.dim)

    def forward(self, texts, mask_generator=None):
        device = self.pformer.llm_proj.weight.device
        ids, mask = self.pformer.tokenize(texts, device)
        t5 = self.llm.is_encoder_decoder
        if not t5:
            ids = mask_tokens(ids, mask, self.pformer.tokenizer.mask_token_id, self.config.mask_rate, mask_generator)
        prompts, cls = self.pformer(ids, mask)  # B x Q x d_LLM, B x D
        loss_c = self.pformer.contrastive_loss(cls)
        loss_vq = prompts.new_zeros(()) if t5 else self.vq_loss(prompts)
        loss_lm = self.llm.lm_loss(prompts, texts)
        return dict(loss=loss_c + loss_vq + loss_lm, c=loss_c, vq=loss_vq, lm=loss_lm)

    def vq_loss(self, prompts):
        """MSE between each prompt vector and its nearest LLM input embedding, the latter detached: a commitment
        term only (the continuous prompts are what the LLM reads). The table is the frozen LLM's own, read in place."""
        table = self.llm.model.get_input_embeddings().weight.detach()  # V x d_LLM
        flat = prompts.reshape(-1, prompts.shape[-1])
        return F.mse_loss(flat.float(), table[nearest_embeddings(flat.detach(), table)].float())


# -----------------------------------------------------------------------------
# 8. torch.compile


def compile_blocks(model):
    """torch.compile, in place, the modules that do the tensor work: the frozen ViT, every Q-Former (and P-Former)
    layer and the frozen LLM. The Python around them stays eager: the tokenizers read the captions as strings, and
    a whole-model torch.compile would specialise on their text and recompile for every batch (then give up after
    8 and run eager). Parameter names do not change, so checkpoints are the same as without compile."""
    for m in model.modules():
        if isinstance(m, (FrozenViT, QFormerLayer)):
            m.compile()
        elif isinstance(m, FrozenLLM):
            m.model.compile()
    return model


# -----------------------------------------------------------------------------
# 9. loading weights by explicit key maps, with shape checks


def _copy_weights(model, mapping, source, what):
    """Copy {our key: tensor} into `model`; fail naming the first few keys whose shapes do not match."""
    params = dict(model.named_parameters())
    missing = [k for k in mapping if k not in params]
    bad = [f"{k} {tuple(v.shape)} vs {tuple(params[k].shape)}" for k, v in mapping.items()
           if k in params and v.shape != params[k].shape]
    if missing or bad:
        raise ValueError(f"{what} from {source} does not fit this model: "
                         + "; ".join((["no such parameter: " + ", ".join(missing[:5])] if missing else [])
                                     + (["shape mismatch: " + ", ".join(bad[:5])] if bad else [])))
    with torch.no_grad():
        for k, v in mapping.items():
            params[k].copy_(v.to(params[k].dtype))


def _bert_state_dict(src):
    """A BERT state dict, keys without the "bert." prefix, from a HF BertModel / BertForMaskedLM object or a
    name or directory (read with BertForMaskedLM so that BERT's MLM head comes along when present)."""
    if isinstance(src, str):
        from transformers import BertForMaskedLM

        src = _load_pretrained(BertForMaskedLM, src, "BERT")
    return {k.removeprefix("bert."): v for k, v in src.state_dict().items()}, getattr(src, "name_or_path", "BERT")


_BERT_LAYER_MAP = [  # (bert key suffix, our key suffixes); the FFN also initialises the query FFN
    ("attention.self.query", ["self_attn.query"]), ("attention.self.key", ["self_attn.key"]),
    ("attention.self.value", ["self_attn.value"]), ("attention.output.dense", ["self_attn.out"]),
    ("attention.output.LayerNorm", ["self_attn.norm"]), ("intermediate.dense", ["ffn_text.fc1", "ffn_query.fc1"]),
    ("output.dense", ["ffn_text.fc2", "ffn_query.fc2"]), ("output.LayerNorm", ["ffn_text.norm", "ffn_query.norm"]),
]


def bert_to_qformer(sd, qformer, prefix="qformer."):
    """Map a BERT state dict onto a Q-Former's parameter names (with `prefix`). The word embeddings keep
    their extra rows ([DEC]) from the random init; token-type embedding 0 is folded into the position
    embeddings so that the text path computes exactly BERT's function (BERT adds it to every token)."""
    out = {}
    words = qformer.word_embeddings.weight.detach().clone()
    n = sd["embeddings.word_embeddings.weight"].shape[0]
    if n > words.shape[0]:
        raise ValueError(f"BERT has {n} word embeddings, the Q-Former only {words.shape[0]}")
    words[:n] = sd["embeddings.word_embeddings.weight"]
    out[prefix + "word_embeddings.weight"] = words
    pos = sd["embeddings.position_embeddings.weight"]
    if "embeddings.token_type_embeddings.weight" in sd:
        pos = pos + sd["embeddings.token_type_embeddings.weight"][0]
    out[prefix + "position_embeddings.weight"] = pos
    for p in ("weight", "bias"):
        out[f"{prefix}embed_norm.{p}"] = sd[f"embeddings.LayerNorm.{p}"]
    has_queries = qformer.config.num_query_tokens > 0
    for i in range(len(qformer.layers)):
        for theirs, ours in _BERT_LAYER_MAP:
            for our in ours:
                if our.startswith("ffn_query") and not has_queries:
                    continue
                for p in ("weight", "bias"):
                    key = f"encoder.layer.{i}.{theirs}.{p}"
                    if key not in sd:
                        raise ValueError(f"BERT checkpoint has no '{key}' (the Q-Former has {len(qformer.layers)} layers)")
                    out[f"{prefix}layers.{i}.{our}.{p}"] = sd[key]
    return out


def init_from_bert(model, bert):
    """Initialise a Blip2Stage1's Q-Former (and ITG head) from bert-base-uncased-format weights."""
    sd, source = _bert_state_dict(bert)
    mapping = bert_to_qformer(sd, model.qformer)
    if "cls.predictions.transform.dense.weight" in sd:  # MLM head -> ITG head; [DEC]'s bias stays 0
        for ours, theirs in (("dense", "transform.dense"), ("norm", "transform.LayerNorm")):
            for p in ("weight", "bias"):
                mapping[f"itg_head.{ours}.{p}"] = sd[f"cls.predictions.{theirs}.{p}"]
        bias = model.itg_head.bias.detach().clone()
        bias[: sd["cls.predictions.bias"].shape[0]] = sd["cls.predictions.bias"]
        mapping["itg_head.bias"] = bias
    _copy_weights(model, mapping, source, "BERT weights")


# Hugging Face BLIP-2 -> this file. Regexes on the HF key; vision keys land on the timm EVA ViT.
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


def hf_to_ours(hf_state_dict):
    """Rename a Hugging Face BLIP-2 state dict (minus the language model) to this file's names.
    Returns (mapping, unmapped HF keys)."""
    mapping, unmapped = {}, []
    for key, value in hf_state_dict.items():
        if key.startswith("language_model."):
            continue
        qkv_bias = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", key)
        if qkv_bias:  # HF keeps one bias cat(q_bias, 0, v_bias); EVA has q_bias and v_bias and no key bias
            q, k, v = value.chunk(3)
            if k.abs().max() > 0:
                raise ValueError(f"{key}: the key part of this bias is not zero, but EVA's attention has no key bias")
            block = f"visual.vit.blocks.{qkv_bias.group(1)}.attn."
            mapping[block + "q_bias"], mapping[block + "v_bias"] = q, v
            continue
        for pattern, repl in _HF_KEY_MAP:
            if re.match(pattern, key):
                mapping[re.sub(pattern, repl, key, count=1)] = value
                break
        else:
            unmapped.append(key)
    return mapping, unmapped


def _config_from_hf(hf_config, **overrides):
    """A Blip2Config with the sizes of a Hugging Face Blip2Config. The vision tower becomes a timm EVA ViT of
    the same shape (the HF vision config already counts only the kept blocks)."""
    v, q = hf_config.vision_config, hf_config.qformer_config
    if v.hidden_act != "gelu" or not v.qkv_bias:
        raise ValueError("only EVA-style vision towers (exact GELU, q/v bias) can be loaded")
    return Blip2Config(
        vit_model="eva_giant_patch14_clip_224", vit_layers=v.num_hidden_layers, vit_pretrained="",
        vit_kwargs=dict(patch_size=v.patch_size, embed_dim=v.hidden_size, depth=v.num_hidden_layers,
                        num_heads=v.num_attention_heads, mlp_ratio=v.intermediate_size / v.hidden_size,
                        **({} if v.layer_norm_eps == 1e-6 else dict(norm_layer=_layer_norm(v.layer_norm_eps)))),
        image_size=v.image_size, ln_vision_eps=v.layer_norm_eps, qformer_init_from_bert=False,
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
        return _load_pretrained(cls, src, f"{cls_name} checkpoint", dtype=DTYPES[dtype]), src
    if not isinstance(src, cls):
        raise TypeError(f"expected a {cls_name} or a directory, got {type(src).__name__}")
    return src, getattr(src, "name_or_path", cls_name) or cls_name


def _load_from_hf(model, hf_model, source):
    mapping, unmapped = hf_to_ours(hf_model.state_dict())
    if unmapped:
        raise ValueError(f"{source}: checkpoint keys with no place in this model: {', '.join(unmapped[:5])}")
    # everything but the LLM (reused as is) and what HF does not keep (ITG head, temperature)
    expected = {k for k, _ in model.named_parameters()
                if not k.startswith(("llm.", "itg_head.")) and k != "temp"}
    missing = sorted(expected - set(mapping))
    if missing:
        raise ValueError(f"{source}: checkpoint lacks weights for: {', '.join(missing[:5])}")
    _copy_weights(model, mapping, source, "BLIP-2 weights")
    return model


def blip2_stage2_from_hf(src, tokenizer=None, dtype="float32", **config_overrides):
    """An official BLIP-2 in Hugging Face format (Blip2ForConditionalGeneration: a directory such as a
    download of Salesforce/blip2-opt-2.7b, or the in-memory model) as a Blip2Stage2. The HF language model
    module is reused as is; `tokenizer` defaults to the one saved in the directory."""
    hf, source = _load_hf_blip2(src, "Blip2ForConditionalGeneration", dtype)
    if tokenizer is None:
        from transformers import AutoTokenizer

        if not isinstance(src, str):
            raise ValueError("pass the LLM tokenizer along with an in-memory Blip2ForConditionalGeneration")
        tokenizer = _load_pretrained(AutoTokenizer, src, "tokenizer")
    config = _config_from_hf(hf.config, vit_dtype=dtype, llm_dtype=dtype, llm_model=source, **config_overrides)
    llm = FrozenLLM(hf.language_model, tokenizer, config.prompt, config.max_txt_len, config.t5_prefix_split)
    model = Blip2Stage2(config, llm=llm)
    return _load_from_hf(model, hf, source)


def blip2_stage1_from_hf(src, tokenizer=None, dtype="float32", **config_overrides):
    """An official BLIP-2 Q-Former checkpoint in Hugging Face format (Blip2ForImageTextRetrieval, e.g. a
    download of Salesforce/blip2-itm-vit-g, or the in-memory model) as a Blip2Stage1. HF keeps no ITG head
    and no temperature: those keep their fresh initialisation."""
    hf, source = _load_hf_blip2(src, "Blip2ForImageTextRetrieval", dtype)
    if tokenizer is None:
        if not isinstance(src, str):
            raise ValueError("pass the BERT tokenizer along with an in-memory Blip2ForImageTextRetrieval")
        tokenizer = src
    config = _config_from_hf(hf.config, vit_dtype=dtype, bert=source, **config_overrides)
    model = Blip2Stage1(config, tokenizer=load_qformer_tokenizer(tokenizer))
    return _load_from_hf(model, hf, source)
