"""
A small self-made world for the CPU runs: rendered scenes of coloured shapes with captions, in the annotation and
tar-shard formats that data.py reads, and tiny backbones saved in their libraries' own formats (a Hugging Face
BERT directory, a Hugging Face causal-LM directory, a timm checkpoint), so that the tiny configs go through the
very loading code of bert-base-uncased, OPT-2.7b and EVA ViT-g.

    python world.py                      # writes data/world (about 10 s)
    python world.py --out=data/w --n_train=64

The backbones are random for now: they exercise every code path, not the method's quality.
"""
import json
import os
import random
import sys
import tarfile

import torch
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (140, 60, 180), "white": (245, 245, 245)}
SHAPES = ["square", "circle", "triangle"]
WORDS = ("a an the of in on with and to is are there what where how many which color shape photo picture "
         "left right above below next big small large one two three image scene question answer short "
         + " ".join(COLORS) + " " + " ".join(SHAPES) + " squares circles triangles").split()
NUMBERS = {1: "one", 2: "two", 3: "three"}


# -----------------------------------------------------------------------------
# scenes


def draw_shape(draw, shape, color, box):
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)


def render_scene(rng, size=64):
    """One scene: 1-3 shapes of one colour and kind, on a grey background. Returns (PIL image, captions)."""
    color, shape, count = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.randint(1, 3)
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    cell = size // 3
    for slot in rng.sample(range(9), count):
        r, c = divmod(slot, 3)
        pad = rng.randint(2, 5)
        draw_shape(draw, shape, COLORS[color], (c * cell + pad, r * cell + pad, (c + 1) * cell - pad, (r + 1) * cell - pad))
    noun = shape if count == 1 else shape + "s"
    captions = [f"{'a' if count == 1 else NUMBERS[count]} {color} {noun}",
                f"a picture of {NUMBERS[count]} {color} {noun}"]
    return image, captions


def write_scenes(out, n_train, n_val, size, seed=0):
    """JPEG scenes under out/images, LAVIS-style annotations (train.json, val.json, train.jsonl) and the same
    training pairs as one webdataset tar shard (shards/train-000.tar)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    splits = {"train": [], "val": []}  # split -> LAVIS-style annotations
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        image, captions = render_scene(rng, size)
        name = f"{split}_{i:05d}.jpg"
        image.save(os.path.join(out, "images", name), quality=95)
        splits[split].append({"image": name, "caption": captions})
    for split, anns in splits.items():
        with open(os.path.join(out, f"{split}.json"), "w") as f:
            json.dump(anns, f)
    with open(os.path.join(out, "train.jsonl"), "w") as f:
        f.writelines(json.dumps(a) + "\n" for a in splits["train"])
    with tarfile.open(os.path.join(out, "shards", "train-000.tar"), "w") as tar:  # img2dataset's layout
        for a in splits["train"]:
            key = a["image"][:-4]
            tar.add(os.path.join(out, "images", a["image"]), arcname=key + ".jpg")
            caption = os.path.join(out, "images", key + ".txt")
            with open(caption, "w") as f:
                f.write(a["caption"][0])
            tar.add(caption, arcname=key + ".txt")
            os.remove(caption)
    return [c for a in splits["train"] for c in a["caption"]]


# -----------------------------------------------------------------------------
# tokenizers and tiny backbones, each in its library's format


def bert_tokenizer(directory, words=WORDS):
    """A WordPiece tokenizer in bert-base-uncased's format ([PAD]=0 ... [MASK]=4) over `words` + characters."""
    from transformers import BertTokenizerFast

    os.makedirs(directory, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(words))
    vocab += [c for c in chars if c not in vocab] + ["##" + c for c in chars] + [".", ",", "?", "!", "'"]
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(os.path.join(directory, "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(directory)
    return tok


def byte_tokenizer(directory=None, t5=False):
    """A byte-level BPE tokenizer without merges (one token per byte). OPT style: <s>=0 <pad>=1 </s>=2 with
    </s> prepended as BOS; T5 style: <pad>=0 </s>=1 <unk>=2 with </s> appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"] if t5 else ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() comes in a different order each call
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    template = "$A </s>" if t5 else "</s> $A"
    tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", vocab["</s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  bos_token=None if t5 else "</s>")
    if directory:
        tok.save_pretrained(directory)
    return tok


def pretrain_llm(llm, tok, texts, steps=300, batch_size=32, lr=3e-3, seed=0):
    """A few hundred steps of next-token prediction on the world's sentences, so that the frozen LLM of the tiny
    runs speaks the world's language. Each sample runs 1 to 3 sentences, each ending in "\n" as in stage 2,
    so that a sentence may start anywhere (after a soft prompt, say), not only at position 0."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(llm.parameters(), lr=lr)
    llm.train()
    for _ in range(steps):
        samples = []
        for _ in range(batch_size):
            idx = torch.randint(len(texts), (int(torch.randint(1, 4, (), generator=g)),), generator=g).tolist()
            samples.append("".join(texts[i] + "\n" for i in idx))
        t = tok(samples, padding="longest", return_tensors="pt")
        labels = t.input_ids.masked_fill(t.attention_mask == 0, -100)
        loss = llm(**t, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return llm.eval(), loss.item()


def write_backbones(out, captions, hidden=64, seed=0):
    """bert/ (BertForMaskedLM + tokenizer), llm/ (OPTForCausalLM pretrained on `captions`, + tokenizer),
    vit.pth (a timm EVA state dict)."""
    import timm
    from transformers import BertConfig, BertForMaskedLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    tok = bert_tokenizer(os.path.join(out, "bert"))
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=2 * hidden)).save_pretrained(
        os.path.join(out, "bert"))
    llm_tok = byte_tokenizer(os.path.join(out, "llm"))
    llm = OPTForCausalLM(OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=len(llm_tok), max_position_embeddings=128, word_embed_proj_dim=hidden,
                                   pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0))
    llm, loss = pretrain_llm(llm, llm_tok, captions, seed=seed)
    llm.save_pretrained(os.path.join(out, "llm"))
    print(f"tiny LLM pretrained on {len(captions)} captions: final LM loss {loss:.3f}")
    vit_kwargs = dict(patch_size=8, embed_dim=hidden, depth=3, num_heads=4, mlp_ratio=2.0)
    vit = timm.create_model("eva_giant_patch14_clip_224", pretrained=False, num_classes=0, img_size=32, **vit_kwargs)
    torch.save(vit.state_dict(), os.path.join(out, "vit.pth"))


def main(out="data/world", n_train=96, n_val=16, image_size=64, seed=0):
    captions = write_scenes(out, n_train, n_val, image_size, seed)
    write_backbones(out, captions, seed=seed)
    print(f"world written to {out}: {n_train} training and {n_val} validation scenes, backbones bert/ llm/ vit.pth")


if __name__ == "__main__":
    kwargs = {}
    for arg in sys.argv[1:]:
        key, _, value = arg.lstrip("-").partition("=")
        kwargs[key] = value if key == "out" else int(value)
    main(**kwargs)
