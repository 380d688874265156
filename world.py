"""
The small synthetic world of this repository, made on the spot and nothing downloaded: scenes of one to three coloured
shapes (5 colours, 3 shapes, 2 sizes, one object per row), captions that name them top to bottom ("a big red circle
above a small blue square"), questions about colour, shape, size, count and position, written in the formats data.py
reads (LAVIS annotation files, a webdataset tar shard, text corpora), and tiny backbones saved in their libraries' own
formats (a Hugging Face BERT directory, a Hugging Face OPT directory, a timm state dict), so that the small runs go
through the very loading code of bert-base-uncased, OPT-2.7b and EVA ViT-g.

Two worlds (the video world of studies/video_world.py builds on this file too):
    python world.py                  # the tiny world in data/world, for the tests and config/*_tiny.py; its
                                     # backbones are nearly random: every code path runs, nothing is learned well
    python world.py --quickstart     # the quick start's world in data/quickstart (its LLM and ViT ship in
                                     # assets/quickstart_backbones; with --pretrain=1 they are pretrained here)
    options, --key=value: --out=DIR and the settings (build_tiny_world's keywords; with --quickstart, those of
             QUICKSTART_WORLD, --pretrain=1, and --ship=DIR: the pretrained LLM and ViT are copied to DIR)

The quick start's world is the one that learns: 2000 image-caption pairs, 100 held-out test scenes with questions,
and a text-only corpus of 20000 more scenes (language plentiful, pairs scarce, as in the P-Former paper). Its LLM is
pretrained on that corpus as OPT was on web text: pages of documents that each begin with BOS (</s>), neighbouring
documents about the same scene, so that what comes before a BOS informs what follows it; a soft prompt in front of
BOS is read the same way. Its ViT is pretrained to name what is in each row of freshly rendered scenes.
"""
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile
import time
from collections import Counter

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from metrics import VQA_PROMPT, write_json  # the LLM learns eval.py's zero-shot VQA prompt from text alone

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (150, 60, 190)}
SHAPES = ["square", "circle", "triangle"]
SIZES = ["big", "small"]
COUNTS = ["one", "two", "three"]
WORDS = ("a an the of is are there what how many color shape object objects shapes big small above below or "
         "picture photo question short answer one two three " + " ".join(COLORS) + " " + " ".join(SHAPES)).split()

# -----------------------------------------------------------------------------
# scenes: what is in them, what is said about them, how they look


def random_scene(rng, max_objects=3):
    """1-3 objects, each a colour (all different), a shape and a size, one per row (3 rows); listed top to bottom.
    Rows, not columns: a random crop keeps vertical order, a horizontal flip would not keep left and right."""
    n = rng.randint(1, max_objects)
    rows = sorted(rng.sample(range(3), n))
    colors = rng.sample(list(COLORS), n)
    return [dict(color=c, shape=rng.choice(SHAPES), size=rng.choice(SIZES), row=r, x=rng.uniform(0.3, 0.7))
            for c, r in zip(colors, rows)]


def scene_caption(scene):
    """The canonical caption: the objects top to bottom, e.g. "a big red circle above a small blue square"."""
    return " above ".join(f"a {o['size']} {o['color']} {o['shape']}" for o in scene)


def scene_captions(scene):
    """Reference captions: the canonical one and two other phrasings (the training pairs and CIDEr's references)."""
    c = scene_caption(scene)
    return [c, f"a picture of {c}", f"there is {c}"]


def scene_questions(scene):
    """(question, answer, type) about colour, shape, size, count and relative position, all answerable from the
    caption; single answers, scored by exact match."""
    out = [("how many shapes are there?", COUNTS[len(scene) - 1], "count")]
    shapes = [o["shape"] for o in scene]
    for o in scene:
        if shapes.count(o["shape"]) == 1:
            out.append((f"what color is the {o['shape']}?", o["color"], "color"))
        out.append((f"what shape is the {o['color']} object?", o["shape"], "shape"))
        out.append((f"is the {o['color']} {o['shape']} big or small?", o["size"], "size"))
    for i, a in enumerate(scene):
        for j, b in enumerate(scene):
            if i != j:
                out.append((f"is the {a['color']} {a['shape']} above or below the {b['color']} {b['shape']}?",
                            "above" if i < j else "below", "position"))
    return out


def qa_sentence(question, answer):
    return VQA_PROMPT.format(question) + " " + answer


def caption_objects(caption):
    """The objects a caption in the world's grammar names, top to bottom: [{size, color, shape}] (a missing word is
    None). "a picture of a big red circle above a small square" -> [big red circle, small None square]."""
    for prefix in ("a picture of ", "there is "):
        caption = caption.removeprefix(prefix)
    objects = []
    for phrase in caption.strip().split(" above "):
        words = phrase.split()
        objects.append(dict(size=next((w for w in words if w in SIZES), None),
                            color=next((w for w in words if w in COLORS), None),
                            shape=next((w for w in words if w in SHAPES), None)))
    return objects


def caption_attribute_hits(caption, scene):
    """What a generated caption gets right of a scene, object by object: the i-th object named (top to bottom) is
    compared with the scene's i-th object. Returns {"color", "shape", "size": objects whose attribute is named
    right, "objects": objects in the scene, "count": 1 if the caption names as many objects as the scene has}."""
    named = caption_objects(caption)
    hits = {k: sum(i < len(named) and named[i][k] == o[k] for i, o in enumerate(scene))
            for k in ("color", "shape", "size")}
    return dict(hits, objects=len(scene), count=int(len(named) == len(scene)))


def caption_attribute_accuracy(captions, scenes):
    """Percent of the scenes' objects whose colour, shape and size the captions name right (caption_attribute_hits),
    and percent of captions that name as many objects as their scene has. captions, scenes: {image_id: ...}."""
    total = dict(color=0, shape=0, size=0, objects=0, count=0)
    for image_id, scene in scenes.items():
        for k, v in caption_attribute_hits(captions.get(image_id, ""), scene).items():
            total[k] += v
    out = {k: 100.0 * total[k] / total["objects"] for k in ("color", "shape", "size")}
    out["count"] = 100.0 * total["count"] / len(scenes)
    return out


def render_scene(scene, size=48):
    """The scene on a grey background, rows centred at 1/4, 1/2, 3/4 of the height (inside the training crops);
    an object with a "y" (a fraction of the height) is drawn there instead of in its row (the video world)."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for o in scene:
        half = (0.12 if o["size"] == "big" else 0.07) * size
        cx, cy = o["x"] * size, o.get("y", 0.25 + 0.25 * o.get("row", 1)) * size
        box = (cx - half, cy - half, cx + half, cy + half)
        color = COLORS[o["color"]]
        if o["shape"] == "square":
            draw.rectangle(box, fill=color)
        elif o["shape"] == "circle":
            draw.ellipse(box, fill=color)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=color)
    return image

# -----------------------------------------------------------------------------
# the formats of data.py and eval.py


def write_scenes(out, n_train, n_test, image_size, seed=0, ext="png", shard=False, max_objects=3, held_out="test"):
    """Scenes under out/images ({split}_{i:05d}.{ext}), train.json (LAVIS captions, three per image) and, for the
    held-out scenes, {held_out}_captions.json (eval.py task=caption) and {held_out}_vqa.json (task=vqa: one
    question of each type the scene allows); with `shard`, the training pairs also as a webdataset tar shard
    (shards/train-000.tar, img2dataset's layout: key.{ext} + key.txt). Returns the random generator."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    splits, vqa = {"train": [], held_out: []}, []
    for i in range(n_train + n_test):
        split = "train" if i < n_train else held_out
        scene = random_scene(rng, max_objects)
        name = f"{split}_{i:05d}.{ext}"
        render_scene(scene, image_size).save(os.path.join(out, "images", name))
        splits[split].append({"image": name, "caption": scene_captions(scene), "scene": scene})
        if split == held_out:
            by_type = {}
            for q, a, kind in scene_questions(scene):
                by_type.setdefault(kind, []).append((q, a))
            for kind, qas in by_type.items():
                q, a = rng.choice(qas)
                vqa.append({"question_id": len(vqa), "image": name, "question": q, "answer": a, "answer_type": kind})
    for name, obj in (("train.json", splits["train"]), (f"{held_out}_captions.json", splits[held_out]),
                      (f"{held_out}_vqa.json", vqa)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f)
    if shard:
        os.makedirs(os.path.join(out, "shards"), exist_ok=True)
        with tarfile.open(os.path.join(out, "shards", "train-000.tar"), "w") as tar:
            for a in splits["train"]:
                key = os.path.splitext(a["image"])[0]
                tar.add(os.path.join(out, "images", a["image"]), arcname=os.path.basename(a["image"]))
                data = a["caption"][0].encode()
                info = tarfile.TarInfo(key + ".txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return rng


def write_corpus(out, scenes):
    """The text-only corpus of scenes that have no image: corpus_captions.txt (three captions each) and
    corpus_qa.txt (every question with its answer, in the VQA template)."""
    with open(os.path.join(out, "corpus_captions.txt"), "w") as f:
        f.writelines(c + "\n" for s in scenes for c in scene_captions(s))
    with open(os.path.join(out, "corpus_qa.txt"), "w") as f:
        f.writelines(qa_sentence(q, a) + "\n" for s in scenes for q, a, _ in scene_questions(s))


def write_video(path_or_file, frames, fps=8):
    """An H.264 mp4 of PIL frames, written with PyAV (its wheel carries FFmpeg): a clip as data.py decodes it."""
    import av
    import numpy as np

    with av.open(path_or_file, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush



# -----------------------------------------------------------------------------
# tokenizers, in their libraries' formats


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

# -----------------------------------------------------------------------------
# pretraining the backbones on the world


def llm_pages(scenes, rng, n_questions=2, captions_of=None, questions_of=None, captions_first=0.0):
    """The LLM's pretraining text, as OPT's: pages of documents, each document "</s>" + a sentence + "\\n", all the
    documents of a page about one scene: one or two of its captions and n_questions questions about it answered in
    the VQA template, in any order after the first caption. So the LLM learns that a document can speak of what the
    one before it described: the place where BLIP-2 puts its soft prompt, in front of BOS. The more questions a page
    asks, the more often the LLM must read a colour, a shape or an order back from the caption: with 2, a 4-layer
    LLM answered colour questions after the true caption no better than chance. captions_first: the share of pages
    that have two or three captions, all before the questions, so that a caption follows only a caption, as it
    follows the soft prompt in stage 2 (docs/results.md: what this does to plain BLIP-2's answers). A share of 0 or 1
    draws no coin per page. captions_of and questions_of: the world's (scene_captions and scene_questions by default;
    the video world's clips)."""
    captions_of, questions_of = captions_of or scene_captions, questions_of or scene_questions
    pages = []
    for s in scenes:
        first = captions_first >= 1 or (captions_first > 0 and rng.random() < captions_first)
        docs = rng.sample(captions_of(s), rng.randint(2, 3) if first else rng.randint(1, 2))
        qas = questions_of(s)
        docs += [qa_sentence(q, a) for q, a, _ in rng.sample(qas, min(n_questions, len(qas)))]
        if n_questions and not first:  # a caption first, then the rest in any order
            docs = docs[:1] + rng.sample(docs[1:], len(docs) - 1)
        pages.append(docs)
    return pages


def pretrain_llm(llm, tok, pages, steps, batch_size=64, lr=2e-3, seed=0, desc="LLM pretraining"):
    """Next-token prediction on pages (lists of sentences, each read as BOS + sentence + "\\n"), AdamW, one-cycle lr.
    The loss covers every token after the first BOS."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    # a warmup of 5%, and at least 2 steps (OneCycleLR divides by zero on a warmup shorter than 2 steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2 / steps))
    encoded = [sum((tok(s + "\n").input_ids for s in page), []) for page in pages]
    llm.train()
    progress = tqdm(range(steps), desc=desc, mininterval=5, file=sys.stdout)
    for _ in progress:
        rows = [encoded[i] for i in torch.randint(len(encoded), (batch_size,), generator=g).tolist()]
        L = max(map(len, rows))
        ids = torch.full((batch_size, L), tok.pad_token_id)
        mask = torch.zeros(batch_size, L, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
        loss = llm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return llm.eval(), loss.item()


def scene_example(rng, size):
    """A still scene and what the ViT learns to name in it, per row: colour (5 + none), shape (3 + none), size (2 +
    none). Returns (image, targets, classes per target)."""
    scene = random_scene(rng)
    t = [len(COLORS), len(SHAPES), len(SIZES)] * 3  # "none" = the last class
    for o in scene:
        t[3 * o["row"]:3 * o["row"] + 3] = [list(COLORS).index(o["color"]), SHAPES.index(o["shape"]),
                                            SIZES.index(o["size"])]
    return render_scene(scene, size), t, [len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1] * 3


def pretrain_vit(vit, image_size, steps, example=scene_example, batch_size=64, lr=2e-3, seed=0):
    """Supervised pretraining of the ViT on freshly rendered images, as EVA was pretrained before BLIP-2 froze it: from
    the mean of its output tokens, name what `example` says is in the image (a cross-entropy per target). Every batch
    is new images, so no augmentation: a random crop would move what the labels name."""
    from data import eval_transform

    rng = random.Random(seed + 1)
    classes = example(random.Random(0), image_size)[2]
    head = torch.nn.Linear(vit.num_features, sum(classes))
    opt = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.1, 2 / steps))
    tf = eval_transform(image_size)
    vit.train()
    progress = tqdm(range(steps), desc="ViT pretraining", mininterval=5, file=sys.stdout)
    for _ in progress:
        images, targets, _ = zip(*(example(rng, image_size) for _ in range(batch_size)))
        x, y = torch.stack([tf(im) for im in images]), torch.tensor(targets)
        logits = head(vit.forward_features(x).mean(1)).split(classes, dim=1)
        loss = sum(torch.nn.functional.cross_entropy(z, y[:, k]) for k, z in enumerate(logits)) / len(classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        acc = torch.stack([(z.argmax(1) == y[:, k]).float().mean() for k, z in enumerate(logits)]).mean()
        progress.set_postfix(loss=f"{loss.item():.3f}", accuracy=f"{acc.item():.2f}", refresh=False)
    return vit.eval(), loss.item()


def write_bert(out, seed, bert_width, bert_layers, words=WORDS):
    """bert/: a BertForMaskedLM of random weights (seeded) and the world's WordPiece tokenizer, in bert-base-uncased's
    format: what the Q-Former and the P-Former are initialised from."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    tok = bert_tokenizer(os.path.join(out, "bert"), words)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=bert_width, num_hidden_layers=bert_layers,
                               num_attention_heads=4, intermediate_size=2 * bert_width)).save_pretrained(
        os.path.join(out, "bert"))


LLM_LAYOUTS = ("opt", "bloom")


def check_llm_layout(layout):
    if layout not in LLM_LAYOUTS:
        raise ValueError(f"llm_layout={layout!r}: expected one of {LLM_LAYOUTS}")


def check_llm_settings(cfg):
    """The quick-start world's LLM settings that would otherwise fail (or, for the share, pass silently) only after
    the scenes are written: checked first."""
    check_llm_layout(cfg["llm_layout"])
    share = cfg["llm_captions_first"]
    if not 0 <= share <= 1:
        raise ValueError(f"llm_captions_first={share!r}: expected a share of pages between 0 and 1")
    if cfg["llm_heads"] < 1 or cfg["llm_width"] % cfg["llm_heads"]:
        raise ValueError(f"llm_heads={cfg['llm_heads']!r}: expected a divisor of llm_width={cfg['llm_width']}")


def write_backbones(out, texts, pages, bert_width, bert_layers, llm_width, llm_layers, llm_steps, vit_kwargs,
                    image_size, vit_steps=0, seed=0, words=WORDS, example=scene_example, llm_batch=64, llm_lr=2e-3,
                    llm_layout="opt", llm_heads=4):
    """bert/ (write_bert), llm/ (a causal LM pretrained on `pages`, its BPE tokenizer learned from `texts`), vit.pth
    (a timm EVA state dict, pretrained on scenes for vit_steps). llm_layout: "opt" (OPT: learned positions added to
    the input embeddings) or "bloom" (BLOOM: a LayerNorm on the input embeddings, soft prompt included, and ALiBi
    positions), of the same width, depth and number of heads. Returns the final losses."""
    import timm
    from transformers import BloomConfig, BloomForCausalLM, OPTConfig, OPTForCausalLM

    check_llm_layout(llm_layout)
    write_bert(out, seed, bert_width, bert_layers, words)
    llm_tok = bpe_tokenizer(os.path.join(out, "llm"), texts)
    special = dict(vocab_size=len(llm_tok), pad_token_id=1, bos_token_id=2, eos_token_id=2)
    if llm_layout == "opt":
        llm = OPTForCausalLM(OPTConfig(hidden_size=llm_width, ffn_dim=4 * llm_width, num_hidden_layers=llm_layers,
                                       num_attention_heads=llm_heads, max_position_embeddings=256,
                                       word_embed_proj_dim=llm_width, dropout=0.0, **special))
    else:  # bloom: its MLP is 4 x width wide, as OPT's above; head h of H penalises each position back by 2^(-8h/H)
        llm = BloomForCausalLM(BloomConfig(hidden_size=llm_width, n_layer=llm_layers, n_head=llm_heads,
                                           hidden_dropout=0.0, attention_dropout=0.0, **special))
    llm, llm_loss = pretrain_llm(llm, llm_tok, pages, llm_steps, batch_size=llm_batch, lr=llm_lr, seed=seed)
    llm.save_pretrained(os.path.join(out, "llm"))
    vit = timm.create_model("eva_giant_patch14_clip_224", pretrained=False, num_classes=0, img_size=image_size,
                            **vit_kwargs)
    vit_loss = pretrain_vit(vit, image_size, vit_steps, example, seed=seed)[1] if vit_steps else None
    torch.save(vit.state_dict(), os.path.join(out, "vit.pth"))
    return llm_loss, vit_loss

# -----------------------------------------------------------------------------
# the two worlds

TINY_VIT = dict(patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)  # config/*_tiny.py's vit_kwargs


def build_tiny_world(out="data/world", n_train=96, n_val=16, image_size=64, llm_steps=600, seed=0):
    """The tiny world: scenes of one or two objects as JPEG files with train.json, train.jsonl, val.json (captions),
    val_vqa.json and a tar shard, and tiny backbones (BERT and ViT random, the OPT pretrained briefly on captions, so
    that a soft prompt can steer it)."""
    t0 = time.time()
    rng = write_scenes(out, n_train, n_val, image_size, seed, ext="jpg", shard=True, max_objects=2, held_out="val")
    os.replace(os.path.join(out, "val_captions.json"), os.path.join(out, "val.json"))
    with open(os.path.join(out, "train.json")) as f:
        train = json.load(f)
    with open(os.path.join(out, "train.jsonl"), "w") as f:
        f.writelines(json.dumps(a) + "\n" for a in train)
    scenes = [a["scene"] for a in train]
    pages = llm_pages(scenes + [random_scene(rng, 2) for _ in range(400)], rng, n_questions=0)
    llm_loss, _ = write_backbones(out, [s for p in pages for s in p], pages, bert_width=64, bert_layers=2, llm_width=64,
                                  llm_layers=2, llm_steps=llm_steps, vit_kwargs=TINY_VIT, image_size=32, seed=seed)
    print(f"tiny world in {out}: {n_train} training and {n_val} validation scenes, backbones bert/ llm/ vit.pth "
          f"(LLM loss {llm_loss:.3f}; {time.time() - t0:.0f}s)")
    return out


# the LLM: width 64 and 4 layers, pages of six questions at lr 1e-3 (a larger lr diverged; with two questions a page,
# reading a colour back from a caption was learnt far later). A BLOOM: its LayerNorm on the input embeddings lets the
# frozen LLM read plain BLIP-2's soft prompt (an OPT took it for a question and wrote one); 8 heads, so that the
# steepest ALiBi slope (0.5 a token) lets "square" take its colour from the word before it rather than from another
# object's (with 4 heads, 0.25, builds bound colour to shape for 59 to 100% of questions); a quarter of the pages put
# their captions first, which plain BLIP-2's prompt stands in for. Builds on other hosts differ in their bytes and in
# how well they bind, so the shipped bytes are the measured ones (docs/results.md).
QUICKSTART_WORLD = dict(n_train=2000, n_test=100, n_text=20000, image_size=48, vit_width=96, vit_depth=4,
                        vit_steps=800, llm_width=64, llm_layers=4, llm_steps=14000, llm_batch=32, llm_lr=1e-3,
                        llm_questions=6, llm_layout="bloom", llm_heads=8, llm_captions_first=0.25, seed=1)


QUICKSTART_BERT = dict(bert_width=128, bert_layers=4)  # random, so made on the spot, shipped backbones or not

# what the quick start's backbones depend on: the scenes of the image-text pairs and the test scenes do not matter
BACKBONE_SETTINGS = ("seed", "n_text", "image_size", "vit_width", "vit_depth", "vit_steps", "llm_width", "llm_layers",
                     "llm_steps", "llm_batch", "llm_lr", "llm_questions", "llm_layout", "llm_heads",
                     "llm_captions_first")


def quickstart_vit_kwargs(cfg):
    return dict(patch_size=8, embed_dim=cfg["vit_width"], depth=cfg["vit_depth"], num_heads=4, mlp_ratio=2.0)


def built_already(out, cfg, name):
    """Whether `out` holds a world built with exactly these settings (its world.json, written last)."""
    done = os.path.join(out, "world.json")
    if os.path.isfile(done):
        with open(done) as f:
            if json.load(f).get("config") == cfg:
                print(f"{name}: reusing {out} (delete it to rebuild)")
                return True
    return False


def file_hashes(out, names=("bert/model.safetensors", "llm/model.safetensors", "llm/tokenizer.json", "vit.pth")):
    """sha256 of each backbone file: a world's identity (runs.py redoes what depends on a world whose
    backbones changed), and the check that building the same world twice gives the same backbones."""
    out_hashes = {}
    for name in names:
        with open(os.path.join(out, name), "rb") as f:
            out_hashes[name] = hashlib.sha256(f.read()).hexdigest()
    return out_hashes


def record_build(out, cfg, **facts):
    write_json(os.path.join(out, "world.json"), {"config": cfg, "backbones": file_hashes(out), **facts}, indent=1)


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "quickstart_backbones")


def shipped_backbones(cfg, directory=SHIPPED, settings=BACKBONE_SETTINGS):
    """The pretrained LLM and ViT as they ship in the repository (an OPT directory and a timm state dict, a few MB:
    assets/quickstart_backbones for the quick start), if they were pretrained with these world settings (those in
    `settings`); else None. `world.py --quickstart --pretrain=1 --ship=DIR` pretrains the quick start's again."""
    record = os.path.join(directory, "backbones.json")
    if not os.path.isfile(record):
        return None
    with open(record) as f:
        made_with = json.load(f)["config"]
    return directory if all(made_with.get(k) == cfg[k] for k in settings) else None


def copy_shipped_backbones(shipped, out):
    """The shipped LLM and ViT into the world `out`; returns what their pretraining recorded (final losses, time)."""
    shutil.copytree(os.path.join(shipped, "llm"), os.path.join(out, "llm"), dirs_exist_ok=True)
    shutil.copy(os.path.join(shipped, "vit.pth"), os.path.join(out, "vit.pth"))
    with open(os.path.join(shipped, "backbones.json")) as f:
        facts = {k: v for k, v in json.load(f).items() if k != "config"}
    print(f"world: the LLM and the ViT from {shipped} (pretrained with these settings)")
    return facts


def build_quickstart_world(out="data/quickstart", pretrain=False, shipped=SHIPPED, **overrides):
    """The quick start's world under `out`, built once: a second call with the same settings returns at once. The
    scenes and the corpus are made on the spot; the LLM and the ViT are the shipped ones when they were pretrained
    with these settings (unless `pretrain`), else pretrained here (the longest step of the quick start by far)."""
    cfg = {**QUICKSTART_WORLD, **overrides}
    check_llm_settings(cfg)  # before anything is written
    if built_already(out, cfg, "world"):
        return cfg
    t0 = time.time()
    write_scenes(out, cfg["n_train"], cfg["n_test"], cfg["image_size"], cfg["seed"])
    corpus_rng = random.Random(f"corpus {cfg['seed']}")  # its own stream: the corpus is the same for any n_test
    text_scenes = [random_scene(corpus_rng) for _ in range(cfg["n_text"])]
    write_corpus(out, text_scenes)
    print(f"world: {cfg['n_train']} training and {cfg['n_test']} test scenes, a text corpus of {cfg['n_text']} more "
          f"scenes ({time.time() - t0:.0f}s)")
    shipped = None if pretrain else shipped_backbones(cfg, shipped)
    if shipped:
        write_bert(out, cfg["seed"], **QUICKSTART_BERT)
        facts = copy_shipped_backbones(shipped, out)
    else:
        with open(os.path.join(out, "corpus_captions.txt")) as f, open(os.path.join(out, "corpus_qa.txt")) as g:
            corpus = f.read().splitlines() + g.read().splitlines()
        llm_loss, vit_loss = write_backbones(
            out, corpus, llm_pages(text_scenes, random.Random(cfg["seed"]), n_questions=cfg["llm_questions"],
                                   captions_first=cfg["llm_captions_first"]),
            **QUICKSTART_BERT, llm_width=cfg["llm_width"], llm_layers=cfg["llm_layers"],
            llm_steps=cfg["llm_steps"], vit_kwargs=quickstart_vit_kwargs(cfg), image_size=cfg["image_size"],
            vit_steps=cfg["vit_steps"], seed=cfg["seed"], llm_batch=cfg["llm_batch"], llm_lr=cfg["llm_lr"],
            llm_layout=cfg["llm_layout"], llm_heads=cfg["llm_heads"])
        facts = dict(llm_loss=llm_loss, vit_loss=vit_loss, pretrain_seconds=time.time() - t0)
        print(f"world: LLM pretrained ({llm_loss:.3f}), ViT pretrained ({vit_loss:.3f})")
    seconds = time.time() - t0
    print(f"world: built in {seconds:.0f}s")
    record_build(out, cfg, seconds=seconds, **facts)
    return cfg


def save_shipped_backbones(out, cfg, directory=SHIPPED):
    """Copy a built world's LLM and ViT to `directory`, with the settings they were pretrained with."""
    os.makedirs(directory, exist_ok=True)
    shutil.copytree(os.path.join(out, "llm"), os.path.join(directory, "llm"), dirs_exist_ok=True)
    shutil.copy(os.path.join(out, "vit.pth"), os.path.join(directory, "vit.pth"))
    with open(os.path.join(out, "world.json")) as f:
        built = json.load(f)
    with open(os.path.join(directory, "backbones.json"), "w") as f:
        json.dump({"config": cfg, **{k: built[k] for k in ("llm_loss", "vit_loss", "pretrain_seconds") if k in built}},
                  f, indent=1)
    print(f"wrote the pretrained LLM and ViT to {directory}")




def quickstart_args(script, data):
    """--key=value arguments that point a stage's config/quickstart_*.py at the quick-start world in `data` (one built
    with another --out or --seed): each data and backbone path of the config, listed once. script: train_pformer.py,
    train_stage1.py or train_stage2.py."""
    from configurator import override_args

    held_out = dict(val_ann=[f"{data}/test_captions.json"], val_image_roots=[f"{data}/images"])
    pairs = dict(train_ann=[f"{data}/train.json"], train_image_roots=[f"{data}/images"], **held_out,
                 vit_pretrained=f"{data}/vit.pth")
    paths = {"train_pformer.py": dict(train_text=[f"{data}/corpus_captions.txt"],
                                      val_text=[f"{data}/test_captions.json"], bert=f"{data}/bert",
                                      llm_model=f"{data}/llm"),
             "train_stage1.py": dict(pairs, bert=f"{data}/bert"),
             "train_stage2.py": dict(pairs, llm_model=f"{data}/llm")}
    if script not in paths:
        raise ValueError(f"quickstart_args: no quick-start config for {script!r} (one of {', '.join(paths)})")
    return override_args(paths[script])

# -----------------------------------------------------------------------------
# what a world's held-out scenes let us score: answers and captions chosen blind, the LLM reading the true caption,
# and the attributes a generated caption names right


def blind_baselines(data, questions, items):
    """Answers and a caption chosen without looking at the image: the most frequent answer, the most frequent
    answer to each question in the text corpus ({data}/corpus_qa.txt), and the most common training caption
    ({data}/train.json; its CIDEr). questions and items: metrics.py's VQA and caption lists of the held-out set."""
    import metrics as M

    with open(f"{data}/corpus_qa.txt") as f:  # the answers of the text corpus (no image-question pairs exist)
        corpus_qa = [line.rstrip("\n").split(VQA_PROMPT.split("{}")[1] + " ") for line in f]
    top_answer = Counter(a for _, a in corpus_qa).most_common(1)[0][0]
    by_question = {}
    for q, a in corpus_qa:
        by_question.setdefault(q, Counter())[a] += 1
    prior = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    with open(f"{data}/train.json") as f:
        top_caption = Counter(c for a in json.load(f) for c in a["caption"]).most_common(1)[0][0]
    references = {it["image_id"]: it["captions"] for it in items}
    return {"top answer": M.generic_vqa_scores({q["question_id"]: top_answer for q in questions}, questions),
            "answer per question": M.generic_vqa_scores(
                {q["question_id"]: prior.get("Question: " + q["question"], top_answer) for q in questions}, questions),
            "top caption CIDEr": M.caption_metrics({i: top_caption for i in references}, references,
                                                   ["CIDEr"]).get("CIDEr")}


def true_caption_vqa(data, questions):
    """The world's frozen LLM answering each held-out question after the scene's true caption as text, in place of
    the soft prompt (the document "</s> caption \\n" before the question's own BOS, as in its pretraining pages), with
    eval.py's generation and scoring: what a perfect description of the image gets from this LLM."""
    import metrics as M
    from backbones import FrozenLLM

    llm = FrozenLLM.from_pretrained(f"{data}/llm")
    with open(f"{data}/test_captions.json") as f:
        scenes = {it["image"]: it["scene"] for it in json.load(f)}
    answers = {}
    for i in range(0, len(questions), 50):
        chunk = questions[i:i + 50]
        t = llm.tokenize([scene_caption(scenes[q["image"]]) + "\n" for q in chunk], padding_side="left")
        out = llm.generate_tokens(llm.embed(t.input_ids), prompt_mask=t.attention_mask,
                                  prompt=[VQA_PROMPT.format(q["question"]) for q in chunk],
                                  num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=0.0)
        answers.update(zip([q["question_id"] for q in chunk], llm.decode(out)))
    scores = M.generic_vqa_scores(answers, questions)
    scores["color_by_objects"] = accuracy_by_objects(answers, questions, scenes, "color")
    return scores


def accuracy_by_objects(answers, questions, scenes, kind):
    """Percent of the `kind` questions answered right, by the number of objects in the question's scene:
    {"1": ..., "2": ..., "3": ...}. Colour questions name a shape and ask for the colour written just before it in
    the caption: with one object the colour can be read off without binding it to the shape; with two or three,
    an LLM that does not bind them scores 50% and 33%. answers: {question_id: text}; scenes: {image: scene}."""
    import metrics as M

    by_objects = {}
    for q in questions:
        if q["answer_type"] == kind:
            by_objects.setdefault(str(len(scenes[q["image"]])), []).append(q)
    # eval.py's scorer on each group; a question left unanswered counts as wrong
    return {n: M.generic_vqa_scores({q["question_id"]: answers.get(q["question_id"], "") for q in group}, group)
            ["overall"] for n, group in sorted(by_objects.items())}


def caption_attributes(captions_file, data, ann="test_captions.json"):
    """What a model's captions of the held-out scenes ({data}/{ann}) get right, object by object
    (caption_attribute_hits): percent of objects whose colour, shape and size they name right, and of captions
    naming as many objects. captions_file: eval.py's caption_captions.json."""
    with open(f"{data}/{ann}") as f:
        scenes = {it["image"]: it["scene"] for it in json.load(f)}
    with open(captions_file) as f:
        captions = {c["image_id"]: c["caption"] for c in json.load(f)}
    return caption_attribute_accuracy(captions, scenes)


if __name__ == "__main__":
    import inspect

    from configurator import apply_overrides

    quickstart = "--quickstart" in sys.argv[1:]
    if quickstart:  # pretrain=1: pretrain the LLM and the ViT here even where shipped ones fit the settings
        options = dict(out="data/quickstart", pretrain=0, ship="", **QUICKSTART_WORLD)
    else:
        options = {k: p.default for k, p in inspect.signature(build_tiny_world).parameters.items()}
    try:
        apply_overrides(options, [a for a in sys.argv[1:] if a != "--quickstart"])
        if quickstart:
            check_llm_settings(options)
    except ValueError as e:
        raise SystemExit(f"world.py{' --quickstart' if quickstart else ''}: {e}")
    if quickstart:
        ship = options.pop("ship")
        built = build_quickstart_world(pretrain=bool(options.pop("pretrain")), **options)
        if ship:  # the pretrained LLM and ViT of this world become the shipped ones (assets/quickstart_backbones)
            save_shipped_backbones(options["out"], built, ship)
    else:
        build_tiny_world(**options)
