"""
The frozen parts of BLIP-2, wrapped: the image encoder (a timm ViT, for images and for the frames of a clip),
pre-extracted clip features in its place, and the LLM driven through a soft prompt (FrozenLLM: any Hugging Face
causal LM; FrozenT5LLM: FlanT5). They stay frozen and in eval mode, compute in their weights' own precision whatever
autocast their caller runs under, and hand the trainable parts float32. Also the loading of weights that every
model here uses: one key-and-shape check (load_weights) and files read without running code (read_state_dict).

model.py builds BLIP-2 and P-Former on top of these.
"""

import hashlib
import inspect
import os
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# -----------------------------------------------------------------------------
# loading weights

def load_weights(module, state_dict, source, required=None, trainable_only=False):
    """module.load_state_dict(state_dict) with one check, whose error names `source` and the first keys at fault:
    every key of state_dict has a place in the module (among its trainable parameters, with trainable_only: this
    project's checkpoints hold nothing else) with the same shape, and every key in `required` (default: the
    module's trainable parameters) is there. Other keys of the module keep their values (frozen parts)."""
    ours = module.state_dict()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    required = trainable if required is None else set(required)
    allowed = trainable if trainable_only else ours
    problems = {"missing": sorted(k for k in required if k not in state_dict),
                "unexpected": sorted(k for k in state_dict if k not in allowed),
                "shape mismatch": [f"{k} {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
                                   for k, v in state_dict.items() if k in ours and v.shape != ours[k].shape]}
    problems = {what: keys for what, keys in problems.items() if keys}
    if problems:
        raise ValueError(f"{source} does not fit this model: " + "; ".join(
            f"{what} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for what, keys in problems.items()))
    module.load_state_dict(state_dict, strict=False)


def read_state_dict(path, mmap=False):
    """A state dict saved with torch.save, read with weights_only=True: tensors and plain values only, so that a
    crafted file cannot run code; errors name the file. mmap=True maps the tensors instead of reading them (for a
    look at the plain values only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)  # on CPU: every rank loads its own copy
    except Exception as e:  # torch's message would suggest weights_only=False, which runs the file's code
        found = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if isinstance(e, pickle.UnpicklingError) and found:
            raise ValueError(f"{path} holds objects other than tensors and plain values, which loading would run "
                             f"as code: not loaded ({found[0][:160]})") from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if "Unsupported operand" in line), lines[0] if lines else type(e).__name__)
        if why.startswith("Weights only load failed"):
            why = type(e).__name__
        raise ValueError(f"{path} is not a readable torch checkpoint (corrupt or truncated?): {why[:200]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict")
    return state


def tensor_checksum(obj):
    """A hash of every tensor in a nested dict / list / tuple (a checkpoint's weights and optimizer state), with its
    key, dtype and shape, in key order: written with a checkpoint and checked when it is read, so that a bit
    flipped on disk or in a copy is an error, not a model that quietly answers worse."""
    h = hashlib.blake2b(digest_size=16)

    def walk(x):
        if torch.is_tensor(x):
            x = x.detach().cpu().contiguous()
            h.update(f"{x.dtype} {tuple(x.shape)}".encode())
            h.update(x.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(f"[{k}]".encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(obj)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# frozen modules


def freeze(module):
    module.requires_grad_(False)
    module.eval()
    return module


class Frozen(nn.Module):
    """A module that stays in eval mode whatever its parent's train() says (dropout and drop-path off)."""

    def train(self, mode=True):
        return super().train(False)


def _half_autocast(device, dtype):
    """Autocast in the frozen weights' own half dtype, so that they are never re-cast: a frozen part computes as
    it was stored, whatever autocast its caller runs under (float32 weights: autocast off, float32 compute)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class FrozenViT(Frozen):
    """The frozen image encoder: a timm ViT truncated to `vit_layers` blocks, final norm removed (BLIP-2 section 3.4:
    "we remove the last layer of the ViT and use the second last layer's output features").
    image B x 3 x 224 x 224 -> B x 257 x 1408 (EVA ViT-g/14), CLS included; clips B x T x 3 x H x W -> B x T x N x W.
    Weights in half precision on GPU with fp32 LayerNorms; the output is float32, the dtype of the trainable parts."""

    def __init__(self, config):
        super().__init__()
        import timm

        name = config.vit_model
        if not timm.is_model(name.split(".")[0]):
            raise ValueError(f"unknown image encoder '{name}': not a timm model name")
        kwargs = dict(num_classes=0, img_size=config.image_size, **config.vit_kwargs)
        try:
            vit = timm.create_model(name, pretrained=config.vit_pretrained == "timm", **kwargs)
        except (OSError, RuntimeError) as e:
            raise RuntimeError(f"cannot load the weights of image encoder '{name}' "
                               f"(vit_pretrained={config.vit_pretrained!r}): {str(e).splitlines()[0]}") from None
        if config.vit_pretrained not in ("", "timm"):
            # a timm state dict on disk, read here rather than by timm, whose file loading checks no keys (a
            # mismatch would leave weights random); a classifier head, if saved, has no place here
            state = {k: v for k, v in read_state_dict(config.vit_pretrained).items() if not k.startswith("head.")}
            load_weights(vit, state, config.vit_pretrained, required=vit.state_dict().keys())
        depth = len(vit.blocks)
        if not 0 < config.vit_layers <= depth:
            raise ValueError(f"vit_layers={config.vit_layers} but '{name}' has {depth} blocks")
        vit.blocks = vit.blocks[: config.vit_layers]
        vit.norm = nn.Identity()  # the raw output of the last kept block
        self.dtype = DTYPES[config.vit_dtype]
        for m in vit.modules():  # half-precision weights, but LayerNorm parameters stay fp32
            if not isinstance(m, nn.LayerNorm):
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(self.dtype)
        self.vit = freeze(vit)
        self.image_size, self.width = config.image_size, vit.num_features
        self.num_tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens  # 257 for ViT-g/14 at 224 px

    @torch.no_grad()
    def forward(self, pixels):
        """B x 3 x S x S -> B x N x W, or B x T x 3 x S x S -> B x T x N x W. Features this encoder computed earlier
        (B x N x W or B x T x N x W) pass through unchanged: a run without augmentation can compute them once."""
        if tuple(pixels.shape[-2:]) == (self.num_tokens, self.width):
            return pixels.float()
        S = self.image_size
        if pixels.ndim not in (4, 5) or tuple(pixels.shape[-3:]) != (3, S, S):
            raise ValueError(f"expected images of shape B x 3 x {S} x {S} (or clips B x T x 3 x {S} x {S}), "
                             f"got {tuple(pixels.shape)}")
        frames = pixels.flatten(0, 1) if pixels.ndim == 5 else pixels  # a clip's frames are a batch of images
        with _half_autocast(frames.device, self.dtype):  # LayerNorms run in fp32
            out = self.vit.forward_features(frames.to(self.dtype)).float()  # (B*T) x N x W
        return out.unflatten(0, pixels.shape[:2]) if pixels.ndim == 5 else out


class ClipFeatures(nn.Module):
    """Pre-extracted clip features in place of the frozen image encoder, as in the P-Former paper's video
    experiments (I3D, 1024-d per segment): B x S x F -> a trainable Linear(F -> D) -> B x S x D, each segment one
    token for the Q-Former's cross-attention. The official video code maps its features to 768 the same way."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.feature_dim, config.hidden_size)
        self.width = config.hidden_size

    def forward(self, features):
        if features.ndim != 3 or features.shape[-1] != self.proj.in_features:
            raise ValueError(f"expected clip features of shape B x S x {self.proj.in_features}, "
                             f"got {tuple(features.shape)}")
        return self.proj(features.float())


def from_pretrained_checked(loader, name, what, **kwargs):
    """from_pretrained with one-line errors: the name could not be loaded, or its checkpoint lacks weights (which
    transformers would fill with random values after a warning)."""
    try:
        model, info = loader.from_pretrained(name, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise _not_loadable(name, what, e) from None
    except RuntimeError as e:  # a weight of the wrong shape
        raise ValueError(f"{what} '{name}' does not fit its config: {str(e).strip().splitlines()[-1][:300]}") from None
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("cls.")]  # a BERT without its MLM head
    if missing:
        raise ValueError(f"{what} '{name}': its checkpoint lacks weights for {', '.join(sorted(missing)[:5])}"
                         f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
    return model


def from_pretrained(loader, name, what, **kwargs):
    """loader.from_pretrained(name) (a tokenizer, a config) with a one-line error naming what could not be loaded."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise _not_loadable(name, what, e) from None


def _not_loadable(name, what, e):
    return ValueError(f"cannot load {what} '{name}': not a local directory with a model, and not "
                      f"available from the Hugging Face Hub ({str(e).splitlines()[0][:200]})")


def newline_token_id(tokenizer):
    """The id of "\\n", which ends every caption in stage 2 and stops generation (OPT: 50118)."""
    return tokenizer("\n", add_special_tokens=False).input_ids[-1]  # SentencePiece may put "▁" first


class FrozenLLM(Frozen):
    """The frozen decoder-only LLM (OPT in the paper; any Hugging Face causal LM: the Llama family (SmolLM2, Qwen),
    BLOOM) driven through `inputs_embeds` by a soft prompt of Q vectors in front of its text (BLIP-2 section 3.3,
    Figure 3 top). FlanT5 is FrozenT5LLM below; wrap_llm and FrozenLLM.from_pretrained pick the class from the
    model's config. Frozen; in eval mode unless `dropout` (the official code leaves OPT in train mode, so its dropout
    0.1 is on in the losses). Computes in its weights' own dtype whatever its caller's autocast.
    `prompt`: a text prompt after the soft prompt (e.g. "a photo of"); `max_txt_len`: text tokens kept.
    `prompt_prefix` and `prompt_suffix`: texts whose token embeddings come before and after the soft prompt, in the
    loss and in generation alike (default none, as the papers: the soft prompt is followed by BOS directly). The
    quick start's LLM read only pages of documents "</s> sentence \\n", so there the soft prompt stands where a
    sentence stands: prefix "</s>", suffix "\\n".

    Lengths in the shape comments: Q soft-prompt vectors; P text-prompt tokens (BOS, where the tokenizer adds one,
    and the text prompt: given, not predicted; none without a text prompt, BOS then being the first target, as in
    LAVIS); T caption tokens (the caption and its "\\n", padding included); L = Q + P + T."""

    is_encoder_decoder = False  # as Hugging Face's configs name it; FrozenT5LLM's is True
    prompt_padding_side = "left"  # generation: left padding keeps every text prompt right next to what follows it

    def __init__(self, hf_model, tokenizer, prompt="", max_txt_len=32, dropout=False, prompt_prefix="",
                 prompt_suffix=""):
        super().__init__()
        if bool(hf_model.config.is_encoder_decoder) != self.is_encoder_decoder:
            raise ValueError(f"{type(self).__name__} cannot wrap {type(hf_model).__name__} (is_encoder_decoder="
                             f"{hf_model.config.is_encoder_decoder}): build it with backbones.wrap_llm")
        self.model = freeze(hf_model)
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:  # Llama-family tokenizers have none; padding is masked out anyway
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_token_id = self.end_of_text_id(tokenizer)
        self.dim = hf_model.get_input_embeddings().embedding_dim
        # HF causal LMs that take `logits_to_keep` (OPT, Llama, Qwen2, ...) compute the LM head on chosen positions
        self._keeps_logits = "logits_to_keep" in inspect.signature(hf_model.forward).parameters
        # a 4-D mask with explicit positions, where the model takes both; models that place every token by its
        # 2-D mask alone (ALiBi: BLOOM) take neither, and get the 2-D mask
        self._takes_4d_mask = (hf_model.config._attn_implementation in ("sdpa", "eager")
                               and "position_ids" in inspect.signature(hf_model.forward).parameters)
        self.prompt, self.max_txt_len, self.dropout = prompt.strip(), max_txt_len, dropout
        self.prefix_ids, self.suffix_ids = [tokenizer(text, add_special_tokens=False).input_ids if text else []
                                            for text in (prompt_prefix, prompt_suffix)]

    @staticmethod
    def end_of_text_id(tokenizer):
        """Where generation stops: "\\n", which ends every caption in training."""
        return newline_token_id(tokenizer)

    def train(self, mode=True):
        super().train(False)
        self.model.train(mode and self.dropout)
        return self

    @classmethod
    def from_pretrained(cls, name, dtype="float32", **options):
        """The LLM `name` (a Hub name or a directory), its weights in `dtype`, wrapped as wrap_llm does: a FrozenLLM
        for a causal LM, a FrozenT5LLM for FlanT5. Options as wrap_llm."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        config = from_pretrained(AutoConfig, name, "LLM")
        loader = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = from_pretrained_checked(loader, name, "LLM", dtype=DTYPES[dtype])
        return wrap_llm(model, from_pretrained(AutoTokenizer, name, "LLM tokenizer"), **options)

    def embed(self, ids):
        return self.model.get_input_embeddings()(ids)

    def autocast(self, device):
        return _half_autocast(device, self.model.dtype)

    def tokenize(self, texts, padding_side="right", max_length=None):
        self.tokenizer.padding_side = padding_side
        return self.tokenizer(texts, padding="longest", truncation=max_length is not None, max_length=max_length,
                              return_tensors="pt")

    def frame_soft_prompt(self, prompt_embeds, prompt_mask=None):
        """The soft prompt between prompt_prefix's and prompt_suffix's token embeddings, B x (F + Q + S) x d_LLM,
        and its mask (None stays None); unchanged without them."""
        if not self.prefix_ids and not self.suffix_ids:
            return prompt_embeds, prompt_mask
        B = prompt_embeds.shape[0]
        prefix, suffix = [self.embed(torch.tensor(ids, device=prompt_embeds.device, dtype=torch.long))[None]
                          .expand(B, -1, -1).to(prompt_embeds.dtype) for ids in (self.prefix_ids, self.suffix_ids)]
        if prompt_mask is not None:  # B x F, B x S: real
            prompt_mask = torch.cat([prompt_mask.new_ones(prefix.shape[:2]), prompt_mask,
                                     prompt_mask.new_ones(suffix.shape[:2])], dim=1)
        return torch.cat([prefix, prompt_embeds, suffix], dim=1), prompt_mask

    def with_soft_prompt(self, prompt_embeds, tokens, prompt_mask=None):
        """[soft prompt; embedded tokens] and its attention mask [prompt_mask, or all 1] + the tokens' mask.
        prompt_embeds B x Q x d_LLM, tokens B x N -> B x (Q + N) x d_LLM, B x (Q + N)."""
        tokens = tokens.to(prompt_embeds.device, non_blocking=True)  # no wait for the GPU
        embeds = torch.cat([prompt_embeds.to(self.model.dtype), self.embed(tokens.input_ids)], dim=1)
        if prompt_mask is None:
            prompt_mask = tokens.attention_mask.new_ones(prompt_embeds.shape[:2])  # B x Q
        return embeds, torch.cat([prompt_mask.to(tokens.attention_mask), tokens.attention_mask], dim=1)

    def inputs(self, prompt_embeds, texts):
        """The LLM's inputs for the LM loss of `texts` after the soft prompt, as keyword arguments of its forward:
        [soft prompt (Q); BOS + text prompt (P) + " " + text + "\\n" (T)], right-padded to the longest (P + T at
        most max_txt_len), its attention mask, and labels that are -100 on the soft prompt, the text prompt and the
        padding. As in LAVIS, the hidden length is that of the prompt alone (BOS + "a photo of"), so the caption's
        first word is learned."""
        Q = prompt_embeds.shape[1]
        joined = [f"{self.prompt} {text}\n" if self.prompt else text + "\n" for text in texts]
        tokens = self.tokenize(joined, max_length=self.max_txt_len)  # B x (P + T)
        embeds, attn = self.with_soft_prompt(prompt_embeds, tokens)  # B x L x d_LLM, B x L
        labels = tokens.input_ids.to(embeds.device, non_blocking=True).masked_fill(attn[:, Q:] == 0, -100)
        if self.prompt:  # BOS and the text prompt are given, not predicted
            labels[:, : len(self.tokenizer(self.prompt).input_ids)] = -100  # the first P
        labels = torch.cat([labels.new_full(prompt_embeds.shape[:2], -100), labels], dim=1)  # B x L
        return dict(inputs_embeds=embeds, attention_mask=attn, labels=labels)

    def lm_loss(self, prompt_embeds, texts):
        """The LM loss of `texts` after the soft prompt (B x Q x d_LLM): token-level cross-entropy of each token
        given those before it, mean over the batch's targets."""
        prompt_embeds = self.frame_soft_prompt(prompt_embeds)[0]  # Q: the framed soft prompt from here on
        with self.autocast(prompt_embeds.device):
            inputs = self.inputs(prompt_embeds, texts)
            labels = inputs.pop("labels")  # B x L
            Q, L = prompt_embeds.shape[1], labels.shape[1]
            if self._takes_4d_mask:  # no host sync (see causal_padding_mask); positions as HF derives them for
                # every real token of [soft prompt; right-padded text]; padding is never attended by a real token
                inputs.update(attention_mask=causal_padding_mask(inputs["attention_mask"], self.model.dtype),
                              position_ids=torch.arange(L, device=labels.device)[None])
            if not self._keeps_logits:
                logits = self.model(**inputs).logits  # B x L x V
                return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
            # speed: the LM head (d_LLM x V) and the softmax only where a text token is predicted: positions
            # Q-1 .. L-2 predict tokens Q .. L-1 (the soft prompt's own positions predict nothing), B x (P + T) x V
            # instead of B x L x V. No KV cache either: nothing is generated.
            keep = torch.arange(Q - 1, L - 1, device=labels.device)
            logits = self.model(**inputs, logits_to_keep=keep, use_cache=False).logits  # B x (P + T) x V
            return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, Q:].flatten())

    @torch.no_grad()
    def generate_tokens(self, prompt_embeds, prompt=None, num_beams=5, max_new_tokens=30, min_new_tokens=1,
                        length_penalty=1.0, prompt_mask=None, **kwargs):
        """Token ids generated after a soft prompt (B x Q x d_LLM) and a text prompt (one string, or one per row;
        default self.prompt): greedy (num_beams=1) or beam search, until eos_token_id; the prompts' ids are not
        returned. prompt_mask (B x Q, 1 = real) hides soft-prompt vectors, e.g. those of a clip's padded frames."""
        prompt = self.prompt if prompt is None else prompt
        prompts = [prompt] * prompt_embeds.shape[0] if isinstance(prompt, str) else list(prompt)
        prompt_embeds, prompt_mask = self.frame_soft_prompt(prompt_embeds, prompt_mask)
        tokens = self.tokenize(prompts, padding_side=self.prompt_padding_side)  # B x P
        with self.autocast(prompt_embeds.device):
            embeds, attn = self.with_soft_prompt(prompt_embeds, tokens, prompt_mask)  # B x (Q + P) x d_LLM
            return self.model.generate(inputs_embeds=embeds, attention_mask=attn, num_beams=num_beams,
                                       max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                       length_penalty=length_penalty, eos_token_id=self.eos_token_id,
                                       pad_token_id=self.tokenizer.pad_token_id, do_sample=False, **kwargs)

    def decode(self, tokens):
        return [s.strip() for s in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


class FrozenT5LLM(FrozenLLM):
    """The frozen encoder-decoder FlanT5 (BLIP-2 section 3.3, Figure 3 bottom). What differs from the decoder-only
    path: the encoder reads [soft prompt; text prefix], the decoder is trained on the rest of the text and
    generates after it, stopping at </s>. The prefix is the text prompt, as in the released code; with
    `prefix_split`, a random first part of each caption, as in the paper (split_captions).

    Lengths in the shape comments: Q soft-prompt vectors; P prefix tokens (with </s>); T target tokens (with </s>).
    The encoder reads Q + P, the decoder T."""

    is_encoder_decoder = True
    prompt_padding_side = "right"  # the encoder reads the whole prompt at once; its padding is masked

    def __init__(self, hf_model, tokenizer, prompt="", max_txt_len=32, dropout=False, prefix_split=False,
                 prompt_prefix="", prompt_suffix=""):
        super().__init__(hf_model, tokenizer, prompt, max_txt_len, dropout, prompt_prefix, prompt_suffix)
        self.prefix_split = prefix_split

    @staticmethod
    def end_of_text_id(tokenizer):
        """Where generation stops: </s>, which ends every decoder target."""
        return tokenizer.eos_token_id

    def inputs(self, prompt_embeds, texts):
        """The LLM's inputs for the LM loss of `texts` after the soft prompt, as keyword arguments of its forward:
        the encoder's [soft prompt (Q); prefix (P)] and its mask, the decoder's targets (T) as labels (-100 on
        padding) and their mask."""
        prefixes, targets = split_captions(texts, self.prompt, self.prefix_split)
        prefix_tokens = self.tokenize(prefixes, max_length=self.max_txt_len)  # B x P
        embeds, attn = self.with_soft_prompt(prompt_embeds, prefix_tokens)  # B x (Q + P) x d_LLM, B x (Q + P)
        target_tokens = self.tokenize(targets, max_length=self.max_txt_len).to(embeds.device, non_blocking=True)
        labels = target_tokens.input_ids.masked_fill(target_tokens.attention_mask == 0, -100)  # B x T
        return dict(inputs_embeds=embeds, attention_mask=attn, labels=labels,
                    decoder_attention_mask=target_tokens.attention_mask)

    def lm_loss(self, prompt_embeds, texts):
        """The LM loss of the decoder's targets given the soft prompt (B x Q x d_LLM) and the prefix: token-level
        cross-entropy, mean over the batch's targets."""
        prompt_embeds = self.frame_soft_prompt(prompt_embeds)[0]
        with self.autocast(prompt_embeds.device):
            inputs = self.inputs(prompt_embeds, texts)
            if self._takes_4d_mask:  # no host sync: the encoder's keys and the decoder's, as 4-D masks
                dtype = self.model.dtype
                inputs.update(attention_mask=causal_padding_mask(inputs["attention_mask"], dtype, causal=False),
                              decoder_attention_mask=causal_padding_mask(inputs["decoder_attention_mask"], dtype))
            return self.model(**inputs, use_cache=False).loss.float()  # no KV cache: nothing is generated


def wrap_llm(hf_model, tokenizer, prompt="", max_txt_len=32, t5_prefix_split=False, dropout=False, prompt_prefix="",
             prompt_suffix=""):
    """A Hugging Face LLM and its tokenizer as this project drives them: FrozenT5LLM for an encoder-decoder
    (FlanT5), FrozenLLM for a causal LM. t5_prefix_split is FlanT5's alone; a causal LM reads whole captions."""
    if hf_model.config.is_encoder_decoder:
        return FrozenT5LLM(hf_model, tokenizer, prompt, max_txt_len, dropout, prefix_split=t5_prefix_split,
                           prompt_prefix=prompt_prefix, prompt_suffix=prompt_suffix)
    return FrozenLLM(hf_model, tokenizer, prompt, max_txt_len, dropout, prompt_prefix, prompt_suffix)


def causal_padding_mask(attention_mask, dtype, causal=True):
    """The 2-D padding mask (B x L, 1 = token) as an additive 4-D mask, B x 1 x L x L (B x 1 x 1 x L for an encoder's
    keys, causal=False): 0 where a query may see a key (causal, the key not padding), the dtype's minimum elsewhere.
    transformers takes a 4-D mask as it is; from a 2-D one it first reads on the host whether the batch has any
    padding, which on a GPU waits for the device at every training step."""
    allowed = attention_mask[:, None, None, :].bool()  # B x 1 x 1 x L
    if causal:
        L = attention_mask.shape[1]
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=allowed.device).tril()  # B x 1 x L x L
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


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
