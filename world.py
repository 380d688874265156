"""
A small self-made world for the CPU runs: rendered scenes of coloured shapes with captions, in the annotation and
tar-shard formats that data.py reads, and tiny backbones saved in their libraries' own formats (a Hugging Face
BERT directory, a Hugging Face causal-LM directory, a timm checkpoint), so that the tiny configs go through the
very loading code of bert-base-uncased, OPT-2.7b and EVA ViT-g.

    python world.py                      # writes data/world (about 10 s)
    python world.py --out=data/w --n_train=64

The backbones of this tiny world are nearly random: they exercise every code path, not the method's quality.

The quick start's world (`python world.py --quickstart`, or quickstart.py) is the one that learns: the scenes,
captions, questions and text-only corpus of data.write_shape_world, a byte-level BPE tokenizer trained on the
corpus, an OPT pretrained on the corpus (captions, and questions answered from a preceding caption in
eval.py's template "Question: ... Short answer: ..."), and a timm EVA ViT pretrained to name what is in each
row of a scene. Everything is written once and reused (world.json records what was built).
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


# -----------------------------------------------------------------------------
# the quick start's world: data from data.py, backbones pretrained on it


def bpe_tokenizer(directory, texts, vocab_size=400):
    """A byte-level BPE tokenizer in OPT's format (<s>=0 <pad>=1 </s>=2 <unk>=3, </s> prepended as BOS), its
    merges learned from `texts` as GPT-2's were from web text: the world's words become single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tk.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  bos_token="</s>")
    tok.save_pretrained(directory)
    return tok


def llm_documents(scenes, rng):
    """(context, text) pairs for the LLM's pretraining. The context is a scene's caption before BOS, where
    BLIP-2's soft prompt will be; the text after BOS is another caption of the scene or a question about it
    answered in eval.py's VQA template. One pair in four has no context (a caption on its own)."""
    from data import qa_sentence, scene_caption, scene_captions, scene_questions

    docs = []
    for s in scenes:
        docs.append(("", rng.choice(scene_captions(s))))
        docs.append((scene_caption(s), rng.choice(scene_captions(s))))
        for q, a, _ in rng.sample(scene_questions(s), 2 if len(s) > 1 else 1):
            docs.append((scene_caption(s), qa_sentence(q, a)))
    rng.shuffle(docs)
    return docs


def pretrain_llm_on_documents(llm, tok, docs, steps, batch_size=64, lr=2e-3, seed=0, context_len=0, log=print):
    """Next-token prediction of [context; BOS; text; "\n"] (the loss on the text only), AdamW, cosine lr.
    With context_len, a context is filled up to that many positions with <pad> tokens (attended), so that BOS
    comes where it will after a soft prompt of context_len vectors."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    nl = tok("\n", add_special_tokens=False).input_ids
    contexts = tok([c for c, _ in docs], add_special_tokens=False).input_ids
    texts = tok([t for _, t in docs], add_special_tokens=False).input_ids
    if context_len:
        contexts = [c + [tok.pad_token_id] * (context_len - len(c)) if c else c for c in contexts]
    enc = [(c, t + nl) for c, t in zip(contexts, texts)]
    llm.train()
    for step in range(steps):
        rows = [enc[i] for i in torch.randint(len(enc), (batch_size,), generator=g).tolist()]
        T = max(len(c) + 1 + len(t) for c, t in rows)
        ids = torch.full((batch_size, T), tok.pad_token_id)
        mask, labels = torch.zeros(batch_size, T, dtype=torch.long), torch.full((batch_size, T), -100)
        for b, (c, t) in enumerate(rows):
            seq = c + [tok.bos_token_id] + t
            ids[b, :len(seq)], mask[b, :len(seq)] = torch.tensor(seq), 1
            labels[b, len(c) + 1:len(seq)] = torch.tensor(t)
        loss = llm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"llm pretraining step {step}: loss {loss.item():.3f}")
    return llm.eval(), loss.item()


def scene_targets(scene):
    """What the ViT learns to name, per row: colour (5 + none), shape (3 + none), size (2 + none)."""
    from data import SCENE_COLORS, SCENE_SHAPES

    t = [len(SCENE_COLORS), len(SCENE_SHAPES), 2] * 3  # "none" = the last class
    for o in scene:
        t[3 * o["row"]:3 * o["row"] + 3] = [list(SCENE_COLORS).index(o["color"]), SCENE_SHAPES.index(o["shape"]),
                                            ["big", "small"].index(o["size"])]
    return t


def pretrain_vit(vit, image_size, steps, batch_size=64, lr=2e-3, seed=0, log=print):
    """Supervised pretraining of the ViT on freshly rendered scenes: from the mean of its output tokens, name
    the colour, shape and size in each row (9 cross-entropies). Every batch is new scenes, so no augmentation:
    a random crop would move the rows that the labels name (the quick start's 400 steps reach about 94% per
    attribute on the last batch, 800 steps about 100%; with data.train_transform's crops, under 60%)."""
    from data import eval_transform, random_scene, render_shapes

    rng = random.Random(seed + 1)
    classes = [6, 4, 3] * 3
    head = torch.nn.Linear(vit.num_features, sum(classes))
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    tf = eval_transform(image_size)
    vit.train()
    for step in range(steps):
        scenes = [random_scene(rng) for _ in range(batch_size)]
        x = torch.stack([tf(render_shapes(s, image_size)) for s in scenes])
        y = torch.tensor([scene_targets(s) for s in scenes])
        logits = head(vit.forward_features(x).mean(1)).split(classes, dim=1)
        loss = sum(torch.nn.functional.cross_entropy(l, y[:, k]) for k, l in enumerate(logits)) / len(classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            acc = torch.stack([(l.argmax(1) == y[:, k]).float().mean() for k, l in enumerate(logits)]).mean()
            log(f"vit pretraining step {step}: loss {loss.item():.3f}, attribute accuracy {acc.item():.2f}")
    return vit.eval(), loss.item()


QUICKSTART_WORLD = dict(n_train=2000, n_test=100, n_text=20000, image_size=48, vit_width=96, vit_depth=4,
                        vit_steps=400, llm_width=128, llm_layers=4, llm_steps=750, llm_context_len=16,
                        seed=0)


def build_quickstart_world(out="data/quickstart", **overrides):
    """The quick start's world under `out`, built once: a second call with the same settings returns at once."""
    from data import write_shape_world

    cfg = {**QUICKSTART_WORLD, **overrides}
    done = os.path.join(out, "world.json")
    if os.path.isfile(done):
        with open(done) as f:
            if json.load(f).get("config") == cfg:
                print(f"world: reusing {out} (delete it to rebuild)")
                return cfg
    import time

    import timm
    from transformers import BertConfig, BertForMaskedLM, OPTConfig, OPTForCausalLM

    times, t0 = {}, time.time()
    scenes = write_shape_world(out, cfg["n_train"], cfg["n_test"], cfg["n_text"], cfg["image_size"], cfg["seed"])
    times["data"] = time.time() - t0
    print(f"world: {cfg['n_train']} training and {cfg['n_test']} test scenes, a text corpus of {len(scenes)} more "
          f"scenes ({times['data']:.0f}s)")
    # the Q-Former's BERT (tokenizer + initial weights) and the LLM's tokenizer
    from data import SCENE_COLORS, SCENE_SHAPES
    torch.manual_seed(cfg["seed"])
    words = WORDS + list(SCENE_COLORS) + SCENE_SHAPES + ["big", "small", "object", "shapes"]
    tok = bert_tokenizer(os.path.join(out, "bert"), words)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=256)).save_pretrained(os.path.join(out, "bert"))
    with open(os.path.join(out, "corpus_captions.txt")) as f, open(os.path.join(out, "corpus_qa.txt")) as g:
        corpus = f.read().splitlines() + g.read().splitlines()
    llm_tok = bpe_tokenizer(os.path.join(out, "llm"), corpus)
    # the LLM, pretrained on the text corpus
    t0 = time.time()
    w = cfg["llm_width"]
    llm = OPTForCausalLM(OPTConfig(hidden_size=w, ffn_dim=4 * w, num_hidden_layers=cfg["llm_layers"],
                                   num_attention_heads=4, vocab_size=len(llm_tok), max_position_embeddings=128,
                                   word_embed_proj_dim=w, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                                   dropout=0.0))
    llm, llm_loss = pretrain_llm_on_documents(llm, llm_tok, llm_documents(scenes, random.Random(cfg["seed"])),
                                              cfg["llm_steps"], seed=cfg["seed"], context_len=cfg["llm_context_len"])
    llm.save_pretrained(os.path.join(out, "llm"))
    times["llm"] = time.time() - t0
    # the ViT, pretrained on rendered scenes
    t0 = time.time()
    vit = timm.create_model("eva_giant_patch14_clip_224", pretrained=False, num_classes=0,
                            img_size=cfg["image_size"], **quickstart_vit_kwargs(cfg))
    vit, vit_loss = pretrain_vit(vit, cfg["image_size"], cfg["vit_steps"], seed=cfg["seed"])
    torch.save(vit.state_dict(), os.path.join(out, "vit.pth"))
    times["vit"] = time.time() - t0
    print(f"world: LLM pretrained ({llm_loss:.3f}, {times['llm']:.0f}s), ViT pretrained ({vit_loss:.3f}, "
          f"{times['vit']:.0f}s)")
    with open(done, "w") as f:
        json.dump({"config": cfg, "seconds": times, "llm_loss": llm_loss, "vit_loss": vit_loss}, f, indent=1)
    return cfg


def quickstart_vit_kwargs(cfg):
    return dict(patch_size=8, embed_dim=cfg["vit_width"], depth=cfg["vit_depth"], num_heads=4, mlp_ratio=2.0)


def main(out="data/world", n_train=96, n_val=16, image_size=64, seed=0):
    captions = write_scenes(out, n_train, n_val, image_size, seed)
    write_backbones(out, captions, seed=seed)
    print(f"world written to {out}: {n_train} training and {n_val} validation scenes, backbones bert/ llm/ vit.pth")


if __name__ == "__main__":
    kwargs, quick = {}, "--quickstart" in sys.argv
    for arg in [a for a in sys.argv[1:] if a != "--quickstart"]:
        key, _, value = arg.lstrip("-").partition("=")
        kwargs[key] = value if key == "out" else int(value)
    build_quickstart_world(**kwargs) if quick else main(**kwargs)
