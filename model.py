"""
BLIP-2 (Li et al., 2023, arXiv 2301.12597) with P-Former (Jian et al., NeurIPS 2023, arXiv 2307.07063), from the
small blocks to the full models. The frozen image encoder and LLM are wrapped in backbones.py; checkpoints.py writes
and reads this project's checkpoints and rebuilds a model from one (from_checkpoint).

Read top to bottom:
  1. config
  2. the Q-Former (BLIP-2 section 3.1): BERT attention and feed-forward blocks, the Q-Former layer, the Q-Former
     with its 32 learned queries and its four attention regimes, BERT's LM head for ITG
  3. the visual path shared by stages 1 and 2: frozen encoder -> ln_vision (+ a frame embedding for clips) -> queries;
     or, for clip features, the official video code's BERT-encoder bridge
  4. Blip2Stage1: ITC + ITM + ITG (BLIP-2 section 3.2)
  5. Blip2Stage2: the LM loss and generation (BLIP-2 section 3.3)
  6. P-Former (P-Former section 3): stage 0 on text alone, and the alignment loss of stages 1 and 2

The official code each part follows (repository: file, in lavis/models/blip2_models/ unless a path is given):
  frozen image encoder (backbones.FrozenViT)  salesforce/LAVIS: lavis/models/eva_vit.py
  Q-Former and stage 1 (ITC + ITM + ITG)      salesforce/LAVIS: Qformer.py, blip2_qformer.py
  stage 2 (backbones.FrozenLLM / FrozenT5LLM) salesforce/LAVIS: blip2_opt.py / blip2_t5.py
  P-Former stage 0 (OPT / FlanT5)             yiren-jian/BLIText: pformer_opt.py / pformer_t5.py
  stage 1 + alignment to the P-Former         yiren-jian/BLIText: blip2_qformer_pformer.py
  stage 2 + alignment (OPT / FlanT5)          yiren-jian/BLIText: blip2_pformer_opt.py / blip2_pformer_t5.py
  clip features through BertBridge            yiren-jian/BLIText-video: video_feature_opt.py (no P-Former),
                                              video_feature_opt_stage1.py (alignment alone), _stage2.py (LM loss)

Shapes in comments: B = batch, T = frames of a clip, Q = 32 queries, L = text length, N = 257 image tokens per frame,
D = 768 (Q-Former width), W = 1408 (image encoder width).
"""

from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones import ClipFeatures, Frozen, FrozenLLM, FrozenViT, freeze, from_pretrained, load_weights
from distributed import gather_no_grad, gather_with_grad, max_over_ranks, rank_and_world_size

# -----------------------------------------------------------------------------
# 1. config


@dataclass
class Blip2Config:
    # frozen image encoder, built by timm
    vit_model: str = "eva_giant_patch14_clip_224"  # or "vit_large_patch14_clip_quickgelu_224", or any timm ViT
    vit_layers: int = 39  # blocks kept: BLIP-2 reads the second-to-last block (EVA-g 40 -> 39, CLIP-L 24 -> 23)
    vit_pretrained: str = "timm"  # "timm": timm's own pretrained weights; a path: a timm state dict; "": random
    vit_kwargs: dict = field(default_factory=dict)  # timm.create_model overrides, for small encoders
    vit_dtype: str = "float32"  # frozen weights; float16 on GPU as in the paper
    image_size: int = 224
    ln_vision_eps: float = 1e-5
    # video: clips of num_frames frames (B x T x 3 x H x W), or pre-extracted clip features (B x S x feature_dim)
    num_frames: int = 1  # > 1: a learned frame embedding per frame (per segment for features), zero at start
    feature_dim: int = 0  # > 0: clip features of this width replace the image encoder (e.g. 1024 for I3D)
    bridge: str = "qformer"  # or "bert" (clip features only): the official video code's BERT encoder, see BertBridge
    # Q-Former (BERT-base sizes) and its text tokenizer
    bert: str = "bert-base-uncased"  # Hugging Face BERT (name or directory): the tokenizer, and the initial weights
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 0  # 0: the BERT tokenizer's with [DEC] (30523 for bert-base-uncased), set by the model loading it
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    embed_dim: int = 256  # ITC projection
    max_txt_len: int = 32  # Q-Former text and LLM text, in tokens
    same_image_positives: bool = True  # stage 1: captions of one image in a batch are ITC positives, no ITM negative
    stage1_losses: tuple = ("itc", "itm", "itg")  # () with a P-Former: alignment only (the paper's video recipe)
    # frozen LLM (stage 2, P-Former)
    llm_model: str = "facebook/opt-2.7b"  # Hugging Face causal LM or FlanT5 (name or directory)
    llm_dtype: str = "float32"  # frozen weights; float16 (OPT) / bfloat16 (FlanT5) on GPU
    llm_dropout: bool = False  # True: the frozen LLM's own dropout is active in training, as in the official runs
    prompt: str = ""  # text prompt before the caption in stage 2 (e.g. "a photo of")
    llm_prompt_prefix: str = ""  # text before the soft prompt (FrozenLLM's prompt_prefix); "" as the papers
    llm_prompt_suffix: str = ""  # text after the soft prompt, before BOS (FrozenLLM's prompt_suffix); "" as the papers
    t5_prefix_split: bool = False  # FlanT5: split each caption at a random word into encoder prefix / target
    # P-Former
    mask_rate: float = 0.25  # stage 0: BERT input tokens replaced by [MASK]
    align_weight: float = 10.0  # stages 1 and 2 with a P-Former: 10 in stage 1, 100 in stage 2
    align_prefix: str = ""  # text before each caption for the P-Former target ("a photo of " in the video recipe)
    pformer_dropout: bool = False  # True: the teacher's dropout is on in training, as the official video runs leave it

    @classmethod
    def pick(cls, config):
        """The Blip2Config named by the keys of a training script's config that are Blip2Config fields."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})

    def llm_options(self):
        """How the frozen LLM is driven (wrap_llm's keyword arguments): stage 0 and stage 2 read it alike."""
        return dict(prompt=self.prompt, max_txt_len=self.max_txt_len, t5_prefix_split=self.t5_prefix_split,
                    dropout=self.llm_dropout, prompt_prefix=self.llm_prompt_prefix,
                    prompt_suffix=self.llm_prompt_suffix)


# -----------------------------------------------------------------------------
# 2. the Q-Former


class Attention(nn.Module):
    """BERT attention block, post-LN: LN(x + Dropout(Dense(MultiHead(x -> keys, values)))).
    Self-attention: keys and values of x itself. Cross-attention: keys and values of the image features, computed by
    `keys_values` once per image and handed to every pass that reads the image (`kv`)."""

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

    def keys_values(self, context):
        """B x N x W -> (k, v), each B x H x N x D/H."""
        return self._heads(self.key(context)), self._heads(self.value(context))

    def forward(self, x, mask=None, past_kv=None, kv=None):
        """mask: boolean, True = may attend, broadcastable to B x H x L x L_kv. past_kv: cached (k, v) of
        the queries, prepended to this pass's keys and values (ITG). kv: the (k, v) to attend to, from
        `keys_values` (cross-attention); default x's own. Returns (output, (k, v))."""
        q = self._heads(self.query(x))
        k, v = self.keys_values(x) if kv is None else kv
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
    """One Q-Former layer on h = [queries (Q); text (L)]: self-attention shared by queries and text,
    cross-attention to the image for the queries (every `cross_attention_freq` layers), and separate
    feed-forward blocks for queries (`ffn_query`) and text (`ffn_text`)."""

    def __init__(self, c, cross_attention, with_queries=True, with_text=True, image_dim=None):
        super().__init__()
        D, args = c.hidden_size, (c.num_heads, c.dropout, c.layer_norm_eps)
        self.self_attn = Attention(D, *args)
        self.cross_attn = Attention(D, *args, context_dim=image_dim) if cross_attention else None
        self.ffn_query = FeedForward(D, c.intermediate_size, c.dropout, c.layer_norm_eps) if with_queries else None
        self.ffn_text = FeedForward(D, c.intermediate_size, c.dropout, c.layer_norm_eps) if with_text else None

    def forward(self, h, n_query, mask=None, image=None, image_mask=None, past_kv=None):
        """image: the image features B x N x W, or this layer's (k, v) of them (QFormer.read_image)."""
        a, kv = self.self_attn(h, mask=mask, past_kv=past_kv)
        queries, text = a[:, :n_query], a[:, n_query:]
        parts = []
        if n_query:
            if self.cross_attn is not None:
                image_kv = self.cross_attn.keys_values(image) if torch.is_tensor(image) else image
                queries = self.cross_attn(queries, mask=image_mask, kv=image_kv)[0]
            parts.append(self.ffn_query(queries))
        if text.shape[1]:
            parts.append(self.ffn_text(text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0], kv


class QFormer(nn.Module):
    """The Querying Transformer: BERT-base whose layers also carry Q learned query tokens that read the frozen
    image features through cross-attention. Four ways to run it, one per attention regime (BLIP-2 figure 2):
      encode_queries: queries alone, with cross-attention                     (ITC image side; stage 2)
      encode_text:    text alone, bidirectional                               (ITC text side; P-Former)
      encode_joint:   queries + text, everything sees everything             (ITM)
      decode_text:    text over the cached query states, causal over text    (ITG)
    `image` is the image features (B x N_img x W), or what `read_image` made of them: the keys and values of every
    cross-attention layer, which stage 1 computes once per image and hands to every pass over that image.
    image_mask (B x N_img, True = real) hides padded frames of a clip from the cross-attention.
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
        """[queries; word + position embeddings of the text] -> LayerNorm -> dropout. B x (Q + L) x D."""
        parts = []
        if with_queries:
            parts.append(self.query_tokens.expand(batch_size if ids is None else ids.shape[0], -1, -1))
        if ids is not None:
            pos = torch.arange(ids.shape[1], device=ids.device)
            parts.append(self.word_embeddings(ids) + self.position_embeddings(pos))
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return F.dropout(self.embed_norm(h), self.config.dropout, self.training)

    def read_image(self, image_embeds):
        """What the cross-attention layers read of the image: each one's (k, v), B x H x N_img x D/H (None for the
        layers without cross-attention). The same for every pass over the same image; the gradient reaches the key
        and value weights and ln_vision through every pass that reads them."""
        return [None if layer.cross_attn is None else layer.cross_attn.keys_values(image_embeds)
                for layer in self.layers]

    def _run(self, h, n_query, mask=None, image=None, image_mask=None, past_kvs=None):
        kvs = []
        for i, layer in enumerate(self.layers):
            layer_image = image if image is None or torch.is_tensor(image) else image[i]  # features, or its (k, v)
            h, kv = layer(h, n_query, mask, layer_image, image_mask, None if past_kvs is None else past_kvs[i])
            kvs.append(kv)
        return h, kvs

    @staticmethod
    def _keys(image_mask):
        return None if image_mask is None else image_mask[:, None, None, :].bool()

    def encode_queries(self, image, image_mask=None):
        """Queries read the image: B x N x W (or read_image's) -> Z: B x Q x D, plus each layer's (k, v) for ITG."""
        batch_size = image.shape[0] if torch.is_tensor(image) else next(kv for kv in image if kv)[0].shape[0]
        h = self.embed(with_queries=True, batch_size=batch_size)
        return self._run(h, h.shape[1], image=image, image_mask=self._keys(image_mask))

    def encode_text(self, ids, mask):
        """Text alone, bidirectional; padding hidden. B x L -> B x L x D ([CLS] feature at position 0)."""
        return self._run(self.embed(ids), 0, mask=mask[:, None, None, :].bool())[0]

    def encode_joint(self, image, ids, mask, image_mask=None):
        """ITM: queries and text see each other (padding hidden); queries also read the image. B x (Q+L) x D."""
        h = self.embed(ids, with_queries=True)
        Q = h.shape[1] - ids.shape[1]
        keys = torch.cat([mask.new_ones(mask.shape[0], Q), mask], dim=1)
        return self._run(h, Q, mask=keys[:, None, None, :].bool(), image=image,
                         image_mask=self._keys(image_mask))[0]

    def decode_text(self, ids, mask, query_kvs):
        """ITG: text token j sees all Q queries (through their cached keys/values from encode_queries)
        and text tokens <= j; queries never see text. B x L -> B x L x D."""
        L, Q = ids.shape[1], query_kvs[0][0].shape[2]
        causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
        allowed = torch.cat([causal.new_ones(L, Q), causal], dim=1)  # L x (Q + L)
        keys = torch.cat([mask.new_ones(mask.shape[0], Q), mask], dim=1).bool()
        return self._run(self.embed(ids), 0, mask=allowed[None, None] & keys[:, None, None, :],
                         past_kvs=query_kvs)[0]


def select_images(image, index):
    """The images `index` (an index tensor into the batch) of a batch of image features or of read_image's output.
    index_select, not image[index]: an image drawn twice sums its two gradients, and indexing's backward (index_put
    with accumulate) adds them in a different order from run to run on a multi-threaded CPU; index_select's
    backward (index_add) adds them in order, so the same seed gives the same weights."""
    if torch.is_tensor(image):
        return image.index_select(0, index)
    return [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index)) for kv in image]


def cat_images(*images):
    """Batches of image features, or read_image's outputs of them, as one batch."""
    if torch.is_tensor(images[0]):
        return torch.cat(images)
    return [None if kvs[0] is None else tuple(torch.cat(t) for t in zip(*kvs)) for kvs in zip(*images)]


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

    tok = bert if not isinstance(bert, str) else from_pretrained(AutoTokenizer, bert, "BERT tokenizer")
    if tok.bos_token != "[DEC]":
        tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def with_vocab_of(config, tokenizer):
    """config with the Q-Former's vocabulary size set from its tokenizer (with [DEC]) unless given: at least that."""
    if config.vocab_size and config.vocab_size < len(tokenizer):
        raise ValueError(f"the Q-Former tokenizer of {config.bert} has {len(tokenizer)} tokens (with [DEC]) but "
                         f"vocab_size={config.vocab_size}")
    return config if config.vocab_size else replace(config, vocab_size=len(tokenizer))


# -----------------------------------------------------------------------------
# 3. the visual path of stages 1 and 2


class BertBridge(nn.Module):
    """The bridge of the official P-Former video code, one of the paper's "varied base modules": a BERT encoder run
    over the S feature segments of a clip (after ClipFeatures' Linear(F -> D)), one output per segment, no queries.
    BERT's embedding block is kept, frozen: it adds the position embedding of each segment's place in time (token
    type 0 folded in) and applies its LayerNorm and dropout. The layers are the Q-Former's text path (shared-weight
    BERT self-attention and FFN). Padded segments are hidden as keys, but their outputs are kept, as the official
    code keeps them: they go to the LLM and to the alignment loss. Built from `bert` (the official code builds it from
    bert-base-uncased in every stage; the frozen embedding block is not in this project's checkpoints).
    B x S x D -> B x S x D."""

    def __init__(self, c):
        super().__init__()
        if not c.feature_dim:
            raise ValueError("bridge='bert' reads pre-extracted clip features: set feature_dim (e.g. 1024 for I3D)")
        if c.num_frames != c.num_query_tokens:
            raise ValueError(f"bridge='bert' gives one soft prompt per feature segment: num_frames ({c.num_frames}) "
                             f"must equal num_query_tokens ({c.num_query_tokens})")
        self.dropout = c.dropout
        self.position_embeddings = nn.Embedding(c.num_frames, c.hidden_size)  # the first S of BERT's
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(QFormerLayer(c, False, with_queries=False) for _ in range(c.num_layers))
        from pretrained import bert_state_dict, bert_to_bridge

        sd, source = bert_state_dict(c.bert)
        load_weights(self, bert_to_bridge(sd, len(self.layers), c.num_frames), f"BERT weights from {source}")
        self.position_embeddings.requires_grad_(False)
        self.embed_norm.requires_grad_(False)

    def forward(self, x, segment_mask=None):
        """x: B x S x D, segment_mask: B x S (1 = a real segment) -> B x S x D."""
        h = self.embed_norm(x + self.position_embeddings.weight[: x.shape[1]])  # B x S x D
        h = F.dropout(h, self.dropout, self.training)
        keys = None if segment_mask is None else segment_mask[:, None, None, :].bool()
        for layer in self.layers:
            h = layer(h, 0, mask=keys)[0]
        return h


class VisualQueries(nn.Module):
    """What stages 1 and 2 share: the frozen encoder (or clip features) -> trainable `ln_vision` -> Q-Former queries.
    A clip's T frames go through the image encoder as a batch of B*T images; a learned frame embedding (zero at
    start) is added to every token of each frame, and the T*N tokens are flattened, so that the 32 queries
    cross-attend over the whole clip and every clip gives 32 query outputs (as VideoBLIP; with T = 1, or before the
    frame embedding has learned anything, a clip model computes exactly what the image model computes, so image
    checkpoints load into it). frame_mask (B x T, 1 = real frame) hides the padded frames of short clips.
    With bridge="bert" a BertBridge takes the Q-Former's place (and name): clip features -> Linear -> BERT, as the
    official video code, with no ln_vision and no frame embedding (BERT's position embeddings order the segments)."""

    def __init__(self, c, vit=None, with_text=True):
        super().__init__()
        if c.bridge not in ("qformer", "bert"):
            raise ValueError(f"bridge={c.bridge!r}: 'qformer' or 'bert'")
        self.visual = vit if vit is not None else ClipFeatures(c) if c.feature_dim else FrozenViT(c)
        if c.bridge == "bert":
            self.ln_vision, self.frame_embed, self.qformer = None, None, BertBridge(c)
            return
        self.ln_vision = nn.LayerNorm(self.visual.width, eps=c.ln_vision_eps)
        self.frame_embed = nn.Parameter(torch.zeros(c.num_frames, self.visual.width)) if c.num_frames > 1 else None
        self.qformer = QFormer(c, image_dim=self.visual.width, with_text=with_text)

    def image_embeds(self, visual, frame_mask=None):
        """ln_vision(frozen encoder(input)) (+ frame embedding): B x N x W for images; B x (T*N) x W and its token
        mask B x (T*N) for clips and clip features (the mask is None for images and for clips without padding)."""
        x = self.ln_vision(self.visual(visual))
        if x.ndim == 3 and isinstance(self.visual, FrozenViT):  # an image: B x N x W
            return x, None
        if x.ndim == 3:  # clip features: one token per segment, B x S x D
            x = x[:, :, None]
        T, N = x.shape[1], x.shape[2]
        if self.frame_embed is not None:
            if T > len(self.frame_embed):
                raise ValueError(f"a clip of {T} frames, but the model has frame embeddings for {len(self.frame_embed)}")
            x = x + self.frame_embed[:T, None].to(x.dtype)  # B x T x N x W
        mask = None if frame_mask is None else frame_mask.bool().repeat_interleave(N, dim=1)  # B x (T*N)
        return x.flatten(1, 2), mask

    def required_weights(self):
        """The trainable weights a checkpoint loaded into this model must hold: all but the frame embedding, which an
        image checkpoint lacks (a clip model started from it keeps its zero frame embedding)."""
        return {n for n, p in self.named_parameters() if p.requires_grad and n != "frame_embed"}

    def query_outputs(self, visual, frame_mask=None):
        """Z: B x Q x D, the 32 query outputs for each image or clip (with the BERT bridge: one per segment)."""
        if isinstance(self.qformer, BertBridge):
            if frame_mask is not None:  # padded segments read as zeros, as the official loader pads them
                visual = visual * frame_mask[..., None].to(visual.dtype)
            return self.qformer(self.visual(visual), frame_mask)
        return self.qformer.encode_queries(*self.image_embeds(visual, frame_mask))[0]


# -----------------------------------------------------------------------------
# 4. stage 1: representation learning with ITC + ITM + ITG


class Blip2Stage1(VisualQueries):
    """BLIP-2 stage 1 (section 3.2): frozen image encoder -> trainable `ln_vision` -> Q-Former, trained with ITC
    (image-text contrastive), ITM (image-text matching with hard negatives) and ITG (image-grounded text generation).
    `loss = itc + itm + itg` (+ align_weight * align with a P-Former, which also trains llm_proj for stage 2)."""

    def __init__(self, config, tokenizer=None, vit=None, pformer=None):
        tokenizer = load_qformer_tokenizer(tokenizer if tokenizer is not None else config.bert)
        config = with_vocab_of(config, tokenizer)
        super().__init__(config, vit)
        c = self.config = config
        # with a P-Former, stage 1 also learns llm_proj (carried into stage 2) by the alignment loss
        self.pformer = FrozenPFormer(pformer, c.num_query_tokens, c.pformer_dropout) if pformer is not None else None
        self.llm_proj = nn.Linear(c.hidden_size, pformer.llm_dim) if pformer is not None else None
        self.vision_proj = nn.Linear(c.hidden_size, c.embed_dim)
        self.text_proj = nn.Linear(c.hidden_size, c.embed_dim)
        self.itm_head = nn.Linear(c.hidden_size, 2)
        self.itg_head = LMHead(c)
        self.temp = nn.Parameter(torch.tensor(0.07))  # not clamped, as in the official code
        for m in (self.vision_proj, self.text_proj, self.itm_head, self.llm_proj):
            if m is not None:
                _init_bert_weights(m)
        self.tokenizer = tokenizer
        self.dec_token_id = self.tokenizer.bos_token_id
        if c.bridge == "bert" and c.stage1_losses:
            raise ValueError(f"stage1_losses={c.stage1_losses}: the BERT bridge has no text path for ITC / ITM / ITG; "
                             f"its stage 1 is the P-Former alignment alone (stage1_losses=())")
        self._freeze_unused(set(c.stage1_losses))

    def _freeze_unused(self, wanted):
        """A subset of the losses (stage1_losses) leaves some weights without a gradient; they are frozen, so that
        the optimizer, the checkpoints and DDP (which expects a gradient for every trainable weight) leave them out.
        ITM draws its negatives from the ITC similarities, so it needs ITC's projections too."""
        if wanted - {"itc", "itm", "itg"}:
            raise ValueError(f"stage1_losses={self.config.stage1_losses}: the losses are itc, itm and itg")
        if not wanted and self.pformer is None:
            raise ValueError("stage 1 has nothing to train: stage1_losses is empty and there is no P-Former")
        unused = [] if wanted & {"itc", "itm"} else [self.vision_proj, self.text_proj, self.temp]
        unused += [] if "itm" in wanted else [self.itm_head]
        unused += [] if "itg" in wanted else [self.itg_head]
        if not wanted & {"itc", "itm"} and self.pformer is None:  # ITG alone reads the queries' keys and values only
            unused.append(self.qformer.layers[-1].ffn_query)
        if not wanted and isinstance(self.qformer, QFormer):  # the queries alone: no text embeddings, no text FFNs
            q = self.qformer
            unused += [q.word_embeddings, q.position_embeddings, *(layer.ffn_text for layer in q.layers)]
        for part in unused:
            part.requires_grad_(False)

    # -- features, shared by the losses and by retrieval evaluation

    def tokenize(self, captions, device):
        """[CLS] caption [SEP], at most max_txt_len tokens, right-padded to the longest caption of this rank's batch
        (LAVIS pads to max_txt_len). Padding is hidden from every pass and every loss: less work, same losses. Only
        ITM's negative texts, gathered from all ranks, need one length for all: see itm_loss."""
        t = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.config.max_txt_len,
                           return_tensors="pt")
        return t.input_ids.to(device, non_blocking=True), t.attention_mask.to(device, non_blocking=True)

    def image_feats(self, Z):
        """ITC image side: normalised projections of the Q query outputs Z (B x Q x D), B x Q x 256, fp32."""
        return F.normalize(self.vision_proj(Z).float(), dim=-1)

    def text_feats(self, ids, mask):
        """ITC text side: normalised projection of the [CLS] output of the text-only pass, B x 256, fp32."""
        return F.normalize(self.text_proj(self.qformer.encode_text(ids, mask)[:, 0]).float(), dim=-1)

    def itm_logits(self, image, ids, mask, image_mask=None):
        """ITM: mean over the Q query outputs of the joint pass of itm_head, B x 2 (class 1 = match). image: the
        features B x N x W, or their keys and values (QFormer.read_image)."""
        out = self.qformer.encode_joint(image, ids, mask, image_mask)
        return self.itm_head(out[:, : self.config.num_query_tokens]).mean(1)

    @staticmethod
    def similarity(img_feats, txt_feats):
        """ITC similarity: max over the Q queries of cosine(query feature, text feature), n_img x n_txt, in fp32
        (the logits and the temperature's gradient are too fine for bf16)."""
        with torch.autocast(img_feats.device.type, enabled=False):
            return torch.einsum("iqd,td->itq", img_feats.float(), txt_feats.float()).max(-1).values

    # -- the three losses

    def forward(self, image, captions, image_ids=None, frame_mask=None, neg_generator=None):
        """image: B x 3 x 224 x 224 (or a clip B x T x 3 x H x W, or clip features), captions: B strings.
        image_ids (B ints): which samples show the same image (see positives). `neg_generator` (same seed on every
        rank) makes the ITM negatives independent of the number of ranks. Returns the losses as a dict: the
        config's stage1_losses (ITC, ITM, ITG) and, with a P-Former, the alignment."""
        losses, wanted = {}, set(self.config.stage1_losses)
        if not wanted:  # the P-Former alignment alone (the video recipe): the query outputs are all it needs
            Z = self.query_outputs(image, frame_mask)  # B x Q x D
        else:
            image_embeds, image_mask = self.image_embeds(image, frame_mask)  # B x N x W
            # the image's keys and values in every cross-attention layer, computed here once for the query pass
            # and ITM
            image_kvs = self.qformer.read_image(image_embeds)  # per layer 2 x B x H x N x D/H
            Z, query_kvs = self.qformer.encode_queries(image_kvs, image_mask)  # B x Q x D, each layer's query (k, v)
            ids, mask = self.tokenize(captions, image.device)
        if wanted & {"itc", "itm"}:  # ITM draws its negatives from the ITC similarities
            img, txt = self.image_feats(Z), self.text_feats(ids, mask)  # B x Q x 256, B x 256
            positives = self.positives(image_ids, B=len(captions), device=image.device)  # B x (B * world)
            itc, sim_i2t, sim_t2i = self.itc_loss(img, txt, positives)
            losses.update({"itc": itc} if "itc" in wanted else {})
            if "itm" in wanted:
                losses["itm"] = self.itm_loss(image_embeds, image_kvs, image_mask, ids, mask, sim_i2t, sim_t2i,
                                              positives, neg_generator)
        if "itg" in wanted:
            losses["itg"] = self.itg_loss(ids, mask, query_kvs)
        if self.pformer is not None:
            losses["align"] = self.pformer.align_loss(self.llm_proj(Z), captions, self.config.align_prefix)
        weights = {"align": self.config.align_weight}
        return {"loss": sum(weights.get(k, 1.0) * v for k, v in losses.items()), **losses}

    def positives(self, image_ids, B, device):
        """B x (B * world) boolean: which samples of the global batch show this rank's images. Without image ids,
        or with same_image_positives=False (as the papers trained), each sample matches only itself; with them, the
        captions of one image in a batch are positives of each other (LAVIS since 2023): ITC spreads its targets
        over them and ITM never draws them as negatives. COCO has five captions per image, so this is common."""
        rank, world = rank_and_world_size()
        if image_ids is None or not self.config.same_image_positives:
            own = torch.arange(B, device=device) + rank * B
            return own[:, None] == torch.arange(B * world, device=device)
        image_ids = image_ids.to(device, non_blocking=True)  # from the data loader: no wait for the GPU
        return image_ids[:, None] == gather_no_grad(image_ids)[None, :]

    def itc_loss(self, img, txt, positives):
        """ITC: similarity = max over the Q queries; both sides gathered from all ranks without gradient;
        targets spread evenly over the positives; symmetric cross-entropy with label smoothing 0.1."""
        img_all, txt_all = gather_no_grad(img), gather_no_grad(txt)  # (B * world) x ...
        sim_i2t = self.similarity(img, txt_all) / self.temp.float()  # B x (B * world)
        sim_t2i = self.similarity(img_all, txt).t() / self.temp.float()  # B x (B * world)
        targets = positives.float() / positives.sum(1, keepdim=True)
        loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
        return loss, sim_i2t, sim_t2i

    def itm_loss(self, image_embeds, image_kvs, image_mask, ids, mask, sim_i2t, sim_t2i, positives, generator=None):
        """ITM: for each text one negative image, for each image one negative text, drawn from the softmax of
        the ITC similarities over the whole global batch with the positives masked out; the negative images
        carry gradient. 3B pairs: (text, image), (text, negative image), (negative text, image), in two passes:
        the pairs of this rank's own texts at their length, and the negative texts at one length for all ranks.
        image_kvs: this rank's images as the cross-attention reads them (QFormer.read_image)."""
        rank, world = rank_and_world_size()
        B = ids.shape[0]
        with torch.no_grad():
            # Exp(1) noise for the whole global batch, same on every rank when `generator` is seeded alike;
            # this rank takes its rows, so the draw does not depend on the number of ranks
            n = sim_t2i.shape[1]
            noise = torch.empty(2, n, n, device=ids.device).exponential_(generator=generator)
            noise = noise[:, rank * B: rank * B + B]
            neg_image = sample_negatives(sim_t2i, positives, noise[0])  # B indices into the global batch
            neg_text = sample_negatives(sim_i2t, positives, noise[1])
        image_mask_all = None if image_mask is None else gather_no_grad(image_mask)
        if world == 1:  # the negative images are this batch's: their keys and values are computed already
            neg_image_kvs = select_images(image_kvs, neg_image)
        else:  # they may be another rank's: computed here from the gathered features. Gathering the keys and values
            # instead would move and hold 6.5 times as much (6 layers x 2 x 768 wide per image token, against 1408):
            # 4.9 GB against 0.74 GB per GPU in bf16 at 8 x 128 images, to save B images' projections.
            # Gathered in the autocast dtype: a quarter of fp32's traffic with bf16, forward and backward.
            half = torch.get_autocast_dtype(image_embeds.device.type) if torch.is_autocast_enabled() else None
            image_all = gather_with_grad(image_embeds.to(half) if half else image_embeds)  # (B * world) x N x W
            neg_image_kvs = self.qformer.read_image(image_all.index_select(0, neg_image))
        image_mask_own = None if image_mask is None else torch.cat([image_mask, image_mask_all[neg_image]])
        own = self.itm_logits(cat_images(image_kvs, neg_image_kvs), torch.cat([ids, ids]), torch.cat([mask, mask]),
                              image_mask_own)  # 2B x 2: (text, image), (text, negative image)
        # the negative texts: every rank pads its ids to the longest batch of all ranks, so that they gather
        length = max_over_ranks(ids.shape[1])  # an integer exchanged on the host: no GPU sync
        pad = (0, length - ids.shape[1])
        ids_all = gather_no_grad(F.pad(ids, pad, value=self.tokenizer.pad_token_id))  # (B * world) x length
        mask_all = gather_no_grad(F.pad(mask, pad, value=0))
        negative_text = self.itm_logits(image_kvs, ids_all[neg_text], mask_all[neg_text], image_mask)  # B x 2
        logits = torch.cat([own, negative_text])  # 3B x 2
        labels = torch.cat([ids.new_ones(B), ids.new_zeros(2 * B)])
        return F.cross_entropy(logits.float(), labels)

    def itg_loss(self, ids, mask, query_kvs):
        """ITG: [CLS] -> [DEC]; each text token predicts the next from the queries and the text before it;
        shifted cross-entropy with label smoothing 0.1, padding ignored."""
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.dec_token_id
        h = self.qformer.decode_text(dec_ids, mask, query_kvs)  # B x L x D
        logits = self.itg_head(h[:, :-1], self.qformer.word_embeddings.weight)
        labels = dec_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               label_smoothing=0.1)


def sample_negatives(sim, positives, noise):
    """One index per row drawn from softmax(sim) with the row's positives masked out, as torch.multinomial would,
    without a Python loop. Gumbel-max trick: argmax(sim - log E), E ~ Exp(1)."""
    sim = sim.float().masked_fill(positives, -10000.0)  # the official code's fill_diagonal_(-10000)
    return (sim - noise.clamp_min(1e-30).log()).argmax(1)


# -----------------------------------------------------------------------------
# 5. stage 2: generative learning through the frozen LLM


class Blip2Stage2(VisualQueries):
    """BLIP-2 stage 2 (section 3.3): frozen image encoder -> ln_vision -> Q-Former (queries only) -> `llm_proj` ->
    a soft prompt of Q vectors in front of the frozen LLM's input embeddings, trained with the LM loss."""

    def __init__(self, config, llm=None, vit=None, pformer=None):
        super().__init__(config, vit, with_text=False)
        self.config = c = config
        self.llm = llm if llm is not None else FrozenLLM.from_pretrained(c.llm_model, c.llm_dtype, **c.llm_options())
        self.llm_proj = nn.Linear(c.hidden_size, self.llm.dim)
        _init_bert_weights(self.llm_proj)
        self.pformer = FrozenPFormer(pformer, c.num_query_tokens, c.pformer_dropout) if pformer is not None else None
        if pformer is not None and pformer.llm_dim != self.llm.dim:
            raise ValueError(f"the P-Former predicts prompts of width {pformer.llm_dim}, the LLM takes {self.llm.dim}")

    def load_stage1(self, state_dict, source):
        """Start from stage 1's trainable weights: ln_vision and the Q-Former's query path (and llm_proj when
        stage 1 trained one for P-Former alignment; the frame embedding of a clip model); stage 1's text-only
        parts and heads are left behind."""
        ours = {n for n, p in self.named_parameters() if p.requires_grad}
        if not any(k.startswith("qformer.") for k in state_dict):
            raise ValueError(f"{source} is not a stage-1 checkpoint of this model: it has no qformer weights")
        load_weights(self, {k: v for k, v in state_dict.items() if k in ours}, source,
                     required=self.required_weights() - {"llm_proj.weight", "llm_proj.bias"})

    def soft_prompt(self, image, frame_mask=None):
        """image (or clip) -> llm_proj(Q-Former query outputs): B x Q x d_LLM."""
        return self.llm_proj(self.query_outputs(image, frame_mask))

    def forward(self, image, captions, frame_mask=None, **unused):
        """LM loss of the captions given the image: {"loss", "lm"} (+ "align" with a P-Former)."""
        prompt = self.soft_prompt(image, frame_mask)
        lm = self.llm.lm_loss(prompt, captions)
        if self.pformer is None:
            return dict(loss=lm, lm=lm)
        align = self.pformer.align_loss(prompt, captions, self.config.align_prefix)
        return dict(loss=lm + self.config.align_weight * align, lm=lm, align=align)

    @torch.no_grad()
    def generate(self, image, prompt=None, frame_mask=None, per_frame=False, **kwargs):
        """Captions or answers for a batch of images or clips: greedy (num_beams=1) or beam search. `prompt`: one
        string for all or one per input (e.g. "Question: what is it? Short answer:"); default config.prompt.
        per_frame (clips): the Q-Former reads each frame on its own and the LLM reads the T*Q soft prompts one
        after the other, as InstructBLIP evaluates an image model on video without training for it.
        Keyword arguments as FrozenLLM.generate_tokens."""
        prompt_mask = None
        if per_frame and image.ndim == 5:
            B, T = image.shape[:2]
            soft = self.soft_prompt(image.flatten(0, 1)).unflatten(0, (B, T)).flatten(1, 2)  # B x (T*Q) x d_LLM
            if frame_mask is not None:
                prompt_mask = frame_mask.repeat_interleave(self.config.num_query_tokens, dim=1)
        else:
            soft = self.soft_prompt(image, frame_mask)
        return self.llm.decode(self.llm.generate_tokens(soft, prompt, prompt_mask=prompt_mask, **kwargs))


# -----------------------------------------------------------------------------
# 6. P-Former


class PFormer(nn.Module):
    """The prompt predictor (P-Former section 3): a BERT encoder (the Q-Former's blocks, without queries and
    cross-attention) whose last-layer [CLS] predicts the soft prompt that makes the frozen LLM reproduce the
    sentence: [CLS] -> cls_proj -> Q prompt vectors -> Linear + Tanh -> llm_proj -> B x Q x d_LLM, the "ideal
    prompt". Plus text_proj and temp for the contrastive term of stage 0."""

    def __init__(self, config, llm_dim, tokenizer=None):
        super().__init__()
        self.tokenizer = load_qformer_tokenizer(tokenizer if tokenizer is not None else config.bert)
        c = self.config = with_vocab_of(config, self.tokenizer)
        self.encoder = QFormer(replace(c, num_query_tokens=0))
        self.num_prompts, self.llm_dim = c.num_query_tokens, llm_dim
        self.cls_proj = nn.Linear(c.hidden_size, c.num_query_tokens * c.hidden_size)
        self.prompt_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.llm_proj = nn.Linear(c.hidden_size, llm_dim)
        self.text_proj = nn.Linear(c.hidden_size, c.embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        for m in (self.cls_proj, self.prompt_proj, self.llm_proj, self.text_proj):
            _init_bert_weights(m)

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
        one view, target = itself; cross-entropy with label smoothing 0.1, in fp32."""
        rank, _ = rank_and_world_size()
        f = F.normalize(self.text_proj(cls).float(), dim=-1)  # B x 256
        with torch.autocast(f.device.type, enabled=False):
            sim = f @ gather_no_grad(f).t() / self.temp.float()  # B x (B * world)
        targets = torch.arange(f.shape[0], device=f.device) + rank * f.shape[0]
        return F.cross_entropy(sim, targets, label_smoothing=0.1)


class FrozenPFormer(Frozen):
    """A trained P-Former as the teacher of stages 1 and 2: frozen, in eval mode for good, never masked.
    loss_align = MSE(llm_proj(Z), P-Former(caption + "\n")), element-wise mean, no normalisation.
    dropout=True leaves its dropout on while the model trains, as the official video runs do (their runner's train()
    reaches the teacher): noisier targets; off by default, so that the target of a caption is one fixed point."""

    def __init__(self, pformer, num_query_tokens, dropout=False):
        super().__init__()
        self.dropout = dropout
        if pformer.num_prompts != num_query_tokens:
            raise ValueError(f"the P-Former predicts {pformer.num_prompts} prompt vectors, "
                             f"the Q-Former has {num_query_tokens} queries")
        self.pformer = freeze(pformer)
        self.llm_dim = pformer.llm_dim

    def train(self, mode=True):
        nn.Module.train(self, mode and self.dropout)
        return self

    @torch.no_grad()
    def target(self, captions, device):
        return self.pformer(*self.pformer.tokenize(captions, device))[0]  # B x Q x d_LLM

    def align_loss(self, prompts, captions, prefix=""):
        return F.mse_loss(prompts.float(), self.target([prefix + c for c in captions], prompts.device).float())


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
        self.llm = llm if llm is not None else FrozenLLM.from_pretrained(c.llm_model, c.llm_dtype, **c.llm_options())
        self.pformer = PFormer(c, self.llm.dim)

    def forward(self, texts, mask_generator=None):
        device = self.pformer.llm_proj.weight.device
        ids, mask = self.pformer.tokenize(texts, device)
        t5 = self.llm.is_encoder_decoder
        if not t5:
            ids = mask_tokens(ids, mask, self.pformer.tokenizer.mask_token_id, self.config.mask_rate, mask_generator)
        prompts, cls = self.pformer(ids, mask)  # B x Q x d_LLM, B x D
        loss_c = self.pformer.contrastive_loss(cls)
        loss_vq = prompts.new_zeros((), dtype=torch.float32) if t5 else self.vq_loss(prompts)
        loss_lm = self.llm.lm_loss(prompts, texts)
        return dict(loss=loss_c + loss_vq + loss_lm, c=loss_c, vq=loss_vq, lm=loss_lm)

    def vq_loss(self, prompts):
        """MSE between each prompt vector and its nearest LLM input embedding, the latter detached: a commitment
        term only (the continuous prompts are what the LLM reads). The table is the frozen LLM's own, read in place."""
        table = self.llm.model.get_input_embeddings().weight.detach()  # V x d_LLM
        flat = prompts.reshape(-1, prompts.shape[-1])
        return F.mse_loss(flat.float(), table[nearest_embeddings(flat.detach(), table)].float())
