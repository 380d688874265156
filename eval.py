"""
Zero-shot evaluation of this project's checkpoints and of official BLIP-2 checkpoints in Hugging Face format, with the
protocols of the BLIP-2 paper (section 4): VQA (VQAv2, OK-VQA, GQA), captioning (COCO Karpathy test, NoCaps) and
image-text retrieval (COCO 5k, Flickr30k 1k, ITC top-k re-ranked by ITM). The scoring is in metrics.py.

    python eval.py --task=vqav2 --ckpt=out/stage2/ckpt.pt
    python eval.py --task=coco_caption --hf=Salesforce/blip2-opt-2.7b        # a Hub name or a local directory
    torchrun --standalone --nproc_per_node=8 eval.py --task=coco_retrieval --ckpt=out/stage1/ckpt.pt
    python eval.py --task=caption --ckpt=out/tiny/stage2/ckpt.pt --ann_file=data/world/val.json \\
        --image_root=data/world/images --device=cpu      # any LAVIS-style caption file

Under torchrun every rank takes every world_size-th question / image / retrieval query; rank 0 gathers the results,
computes the metrics, prints them and writes them (answers, captions, metrics) to out_dir; <task>_metrics.json also
records what produced them (metrics.provenance: commit, library versions, threads, device). While it runs, each rank
writes the answers / captions it has generated to out_dir/<task>_progress.rank<r>.jsonl, batch by batch: a run
stopped half-way (an unreadable video with strict_images, a full disk, a signal) keeps them there.
"""
import json
import os
import sys
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import metrics as M
from metrics import VQA_PROMPT
import train_common as tc
from checkpoints import from_checkpoint
from configurator import apply_overrides, config_snapshot
from data import _unreadable, clean_caption, eval_transform, load_clip_features
from video import ClipTransform, decode_frames, pad_clip
from distributed import cleanup_distributed, gather_objects, is_master, setup_distributed
from model import Blip2Stage1, Blip2Stage2

# -----------------------------------------------------------------------------
# default config
task = "vqav2"  # vqav2 | okvqa | gqa | vqa (generic list) | coco_caption | nocaps | caption (generic list) |
#                 coco_retrieval | flickr_retrieval | video: msrvtt_caption | msvd_caption | vatex_caption |
#                 video_caption (generic) | msrvtt_qa | msvd_qa | video_qa (generic)
# the model: exactly one of
ckpt = ""  # this project's checkpoint: stage 2 (VQA, captioning) or stage 1 (retrieval), e.g. out/stage2/ckpt.pt
hf = ""  # a Hugging Face BLIP-2 (Hub name or directory): Blip2ForConditionalGeneration or Blip2ForImageTextRetrieval
model_overrides = {}  # Blip2Config fields to change in a checkpoint's config, e.g. {'llm_model': '/models/opt-2.7b'}
hf_dtype = ""  # frozen ViT / LLM weights of an HF model; '' = float32 on CPU, float16 (bfloat16 for T5) on GPU
# data: '' = the task's default in TASK_DATA
ann_file = ""  # VQAv2 / OK-VQA questions, GQA questions, or the caption / retrieval / generic annotation file
answers_file = ""  # VQAv2 / OK-VQA: the annotations file with the answers
image_root = ""  # images, videos, or clip features (name.npy for the annotations' name.mp4), as the model reads
image_pattern = ""  # VQAv2 / OK-VQA / GQA: the image file name from the image id
skip_missing_images = False  # False: a missing image / video file stops the run at start, naming it; True: skipped
#                              and counted (scored as missing)
strict_images = False  # False: an image / video that cannot be decoded is skipped with a warning naming it and
#                        counted (scored as missing), as in training and LAVIS; True: it stops the run
limit = 0  # evaluate only the first `limit` questions / images (quick checks); 0 = all
# generation (VQA and captioning); None = the task's default (BLIP-2 paper, section 4)
prompt = None  # VQA: a template with {} for the question; captioning: None = the model's config prompt
num_beams = 5
max_new_tokens = None  # VQA 10, captioning 30
min_new_tokens = None  # VQA 1, captioning 8
length_penalty = None  # VQA: -1 for FlanT5, 0 for decoder-only LLMs; captioning: 1.0
caption_scorers = ["BLEU", "METEOR", "ROUGE-L", "CIDEr", "SPICE"]  # pycocoevalcap's; METEOR's Java start-up is slow
# video: clips of the model's num_frames frames, sampled uniformly (LAVIS)
num_frames = 0  # 0: the model's own (its config); an image model needs per_frame for clips
per_frame = False  # the Q-Former reads each frame alone and the LLM reads all their soft prompts (InstructBLIP)
# retrieval
k_test = 128  # ITM re-ranks the top k_test candidates of every query
# system
batch_size = 64  # images per forward pass (and image-text pairs per ITM pass)
num_workers = 4
device = "cuda"
dtype = "bfloat16"  # autocast on CUDA; CPU runs in float32
log_every = 30.0  # seconds between progress updates
out_dir = "out/eval"
# -----------------------------------------------------------------------------
DEFAULTS = config_snapshot(globals())  # the config above, before anything else is defined

TASK_FAMILY = {"vqav2": "vqa", "okvqa": "vqa", "gqa": "vqa", "vqa": "vqa", "coco_caption": "caption",
               "nocaps": "caption", "caption": "caption", "coco_retrieval": "retrieval",
               "flickr_retrieval": "retrieval", "msrvtt_caption": "caption", "msvd_caption": "caption",
               "vatex_caption": "caption", "video_caption": "caption", "msrvtt_qa": "vqa", "msvd_qa": "vqa",
               "video_qa": "vqa"}
VIDEO_TASKS = {t for t in TASK_FAMILY if t.startswith(("msrvtt", "msvd", "vatex", "video"))}
# default files, LAVIS' layout (the annotation files are LAVIS' / the benchmarks' own)
TASK_DATA = {
    "vqav2": dict(ann_file="data/vqav2/annotations/v2_OpenEnded_mscoco_val2014_questions.json",
                  answers_file="data/vqav2/annotations/v2_mscoco_val2014_annotations.json",
                  image_root="data/coco/images/val2014", image_pattern="COCO_val2014_{image_id:012d}.jpg"),
    "okvqa": dict(ann_file="data/okvqa/annotations/OpenEnded_mscoco_val2014_questions.json",
                  answers_file="data/okvqa/annotations/mscoco_val2014_annotations.json",
                  image_root="data/coco/images/val2014", image_pattern="COCO_val2014_{image_id:012d}.jpg"),
    "gqa": dict(ann_file="data/gqa/annotations/testdev_balanced_questions.json", image_root="data/gqa/images",
                image_pattern="{image_id}.jpg"),
    "vqa": dict(ann_file="", image_root=""),
    "coco_caption": dict(ann_file="data/coco/annotations/coco_karpathy_test.json", image_root="data/coco/images"),
    "nocaps": dict(ann_file="data/nocaps/annotations/nocaps_val_4500_captions.json",
                   image_root="data/nocaps/images"),
    "caption": dict(ann_file="", image_root=""),
    "coco_retrieval": dict(ann_file="data/coco/annotations/coco_karpathy_test.json", image_root="data/coco/images"),
    "flickr_retrieval": dict(ann_file="data/flickr30k/annotations/flickr30k_test.json",
                             image_root="data/flickr30k/images"),
    "msrvtt_caption": dict(ann_file="data/msrvtt/annotations/cap_test.json", image_root="data/msrvtt/videos"),
    "msvd_caption": dict(ann_file="data/msvd/annotations/cap_test.json", image_root="data/msvd/videos"),
    "vatex_caption": dict(ann_file="data/vatex/annotations/cap_val.json", image_root="data/vatex/features"),
    "video_caption": dict(ann_file="", image_root=""),
    "msrvtt_qa": dict(ann_file="data/msrvtt/annotations/qa_test.json", image_root="data/msrvtt/videos"),
    "msvd_qa": dict(ann_file="data/msvd/annotations/qa_test.json", image_root="data/msvd/videos"),
    "video_qa": dict(ann_file="", image_root=""),
}

# -----------------------------------------------------------------------------
# the model


def load_model(ckpt="", hf="", device="cpu", model_overrides=None, hf_dtype=""):
    """A Blip2Stage1 / Blip2Stage2 in eval mode on device, from this project's checkpoint (checkpoints.from_checkpoint)
    or from a Hugging Face BLIP-2 (a Hub name or a directory; its config names the architecture)."""
    if bool(ckpt) == bool(hf):
        raise ValueError("give the model as exactly one of --ckpt=out/stage2/ckpt.pt or --hf=<HF BLIP-2 name or dir>")
    if ckpt:
        return from_checkpoint(ckpt, device, model_overrides)
    from transformers import AutoConfig

    from backbones import from_pretrained
    from pretrained import blip2_stage1_from_hf, blip2_stage2_from_hf

    config = from_pretrained(AutoConfig, hf, "BLIP-2 config")
    architectures = getattr(config, "architectures", None) or []
    t5 = getattr(getattr(config, "text_config", None), "model_type", None) == "t5"
    dtype = hf_dtype or ("float32" if not device.startswith("cuda") else "bfloat16" if t5 else "float16")
    overrides = dict(model_overrides or {})
    if "Blip2ForConditionalGeneration" in architectures:
        model = blip2_stage2_from_hf(hf, dtype=dtype, **overrides)
    elif "Blip2ForImageTextRetrieval" in architectures:
        model = blip2_stage1_from_hf(hf, dtype=dtype, **overrides)
    else:
        raise ValueError(f"--hf={hf}: architectures {architectures} has neither Blip2ForConditionalGeneration nor "
                         f"Blip2ForImageTextRetrieval")
    return model.to(device).eval()


def generation_kwargs(cfg, family, model):
    """num_beams, max/min_new_tokens and length_penalty for VQA or captioning, task defaults filled in."""
    t5 = model.llm.is_encoder_decoder
    defaults = dict(max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0 if t5 else 0.0) if family == "vqa" \
        else dict(max_new_tokens=30, min_new_tokens=8, length_penalty=1.0)
    out = dict(num_beams=cfg["num_beams"])
    for k, v in defaults.items():
        out[k] = v if cfg[k] is None else cfg[k]
    out["length_penalty"] = float(out["length_penalty"])
    return out

# -----------------------------------------------------------------------------
# images, sharding, progress


def reads_features(cfg):
    """Whether the model of a video task reads clip features (name.npy) in place of the videos: its config's
    feature_dim, read before the model is built so that a missing file is reported at once (the checkpoint is
    memory-mapped: its weights are not read). A Hugging Face BLIP-2 reads videos."""
    if cfg["task"] not in VIDEO_TASKS:
        return False
    config = {}
    if cfg["ckpt"] and os.path.isfile(cfg["ckpt"]):
        try:
            config = torch.load(cfg["ckpt"], map_location="cpu", weights_only=True, mmap=True).get("config") or {}
        except Exception:  # not a readable checkpoint: load_model says why
            pass
    return {**config, **(cfg["model_overrides"] or {})}.get("feature_dim", 0) > 0


def media_path(cfg, name, features):
    """The file the model reads for an annotation's image / video `name`: name.npy for a clip-feature model."""
    path = os.path.join(cfg["image_root"], name)
    return os.path.splitext(path)[0] + ".npy" if features else path


class MediaFiles(Dataset):
    """(media, frame mask, index) for a list of files: eval-transformed images, clips of num_frames frames sampled
    uniformly (videos), or clip features (.npy), as the model reads. A file that cannot be read gives (None, None,
    index) after a warning naming it (the caller skips and counts it), or with strict an error naming it."""

    def __init__(self, paths, image_size, num_frames=0, features=False, strict=False):
        self.paths, self.num_frames, self.features, self.strict = list(paths), num_frames, features, strict
        self.transform = ClipTransform(image_size, train=False) if num_frames else eval_transform(image_size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        try:
            if self.features:
                item = pad_clip(load_clip_features(path, self.num_frames), self.num_frames)
            elif self.num_frames:
                item = pad_clip(self.transform(decode_frames(path, self.num_frames, "uniform")), self.num_frames)
            else:
                with Image.open(path) as img:
                    item = {"image": self.transform(img.convert("RGB")), "frame_mask": torch.ones(1, dtype=torch.long)}
        except Exception as e:  # PIL and PyAV have many exception types for broken files
            _unreadable(path, e, self.strict)
            return None, None, i
        return item["image"], item["frame_mask"], i


def collate_readable(batch):
    """(media, frame masks, indices) of the batch's readable files, and the indices of the unreadable ones."""
    good = [b for b in batch if b[0] is not None]
    bad = [b[2] for b in batch if b[0] is None]
    if not good:
        return None, None, [], bad
    media, masks, indices = zip(*good)
    return torch.stack(media), torch.stack(masks), list(indices), bad


def clip_frames(model, cfg):
    """Frames (or feature segments) per clip for a video task: cfg's num_frames, else the model's; 0 for images.
    A clip model has a frame embedding for each of its num_frames: more frames than that is an error at start."""
    if cfg["task"] not in VIDEO_TASKS:
        return 0
    c = model.config
    frames = cfg["num_frames"] or c.num_frames
    if frames > c.num_frames > 1 and not cfg["per_frame"]:
        raise ValueError(f"num_frames={frames}, but the model reads at most {c.num_frames} frames per clip (it has a "
                         f"frame embedding for each): give num_frames={c.num_frames} or fewer")
    return frames


def media_loader(paths, model, cfg, strict):
    """The DataLoader of an evaluation's images or clips (see clip_frames); its batches as collate_readable's."""
    c = model.config
    return DataLoader(MediaFiles(paths, c.image_size, clip_frames(model, cfg), c.feature_dim > 0, strict),
                      batch_size=cfg["batch_size"], shuffle=False, num_workers=cfg["num_workers"],
                      collate_fn=collate_readable)


def drop_missing_files(items, cfg, key, what, features=False, skippable=True):
    """Split items by whether their image / video / feature file exists. A missing one is an error naming it, or
    with cfg skip_missing_images a printed skip that the caller counts; nothing left to evaluate is an error.
    Returns (kept, skipped)."""
    media = "feature" if features else "video" if cfg["task"] in VIDEO_TASKS else "image"
    missing = [(it[key], p) for it in items if not os.path.isfile(p := media_path(cfg, it["image"], features))]
    skip = cfg["skip_missing_images"] and skippable
    if missing and not skip:
        hint = "; --skip_missing_images=True skips and counts them" if skippable else ""
        raise FileNotFoundError(f"{media} file not found for {what} {missing[0][0]!r}: {missing[0][1]} "
                                f"({len(missing)} of {len(items)} {what}s have no {media} file{hint})")
    if missing and len(missing) == len(items):
        raise FileNotFoundError(f"nothing to evaluate: the {media} file of every one of the {len(items)} {what}s is "
                                f"missing under {cfg['image_root']!r}, e.g. {missing[0][1]}")
    if missing and is_master():
        print(f"skipping {len(missing)} of {len(items)} {what}s without {media} file, e.g. {missing[0][1]}")
    gone = {m[0] for m in missing}
    return [it for it in items if it[key] not in gone], [it for it in items if it[key] in gone]


def merge_predictions(parts):
    """{key: prediction} from the ranks' [(key, prediction)] lists; a key twice is an error."""
    out = {}
    for part in parts:
        for k, v in part:
            if k in out:
                raise RuntimeError(f"{k!r} was evaluated twice (sharding bug)")
            out[k] = v
    return out


def progress(what, total, cfg):
    """A tqdm progress bar on rank 0 (silent elsewhere), updated at most every cfg['log_every'] seconds."""
    return tqdm(total=total, desc=what, disable=not is_master(), mininterval=cfg["log_every"], file=sys.stdout)

# -----------------------------------------------------------------------------
# VQA and captioning: generation


@torch.no_grad()
def generate_texts(model, paths, prompts, gen_kwargs, cfg, on_batch=None):
    """The text a Blip2Stage2 generates for each (image or clip, text prompt) pair, in order; None for a file that
    cannot be read (see MediaFiles). on_batch(indices, texts) after each batch, e.g. to save them."""
    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompts")
    out = [None] * len(paths)
    for media, frame_mask, idx, unreadable in media_loader(paths, model, cfg, cfg["strict_images"]):
        texts = []
        if idx:
            clips = media.ndim == 5 or model.config.feature_dim > 0
            with tc.autocast_context(cfg["device"], cfg["dtype"]):
                texts = model.generate(media.to(cfg["device"]), prompt=[prompts[i] for i in idx],
                                       frame_mask=frame_mask.to(cfg["device"]) if clips else None,
                                       per_frame=cfg["per_frame"], **gen_kwargs)
        for i, text in zip(idx, texts):
            out[i] = text
        if on_batch is not None:
            on_batch(idx + unreadable, texts + [None] * len(unreadable))
    return out


def progress_file(cfg, rank):
    return os.path.join(cfg["out_dir"], f"{cfg['task']}_progress.rank{rank}.jsonl")


def generate_all(model, items, key, prompts, family, cfg, rank=0, world_size=1):
    """{item[key]: generated text, None for an unreadable image / video} of all the items, gathered from the ranks:
    each takes every world_size-th item and appends each batch's texts to its progress file as they come."""
    mine = list(range(rank, len(items), world_size))
    path = progress_file(cfg, rank)
    with open(path, "w", encoding="utf-8") as log, \
            progress(f"{cfg['task']} (rank {rank} of {world_size})", len(mine), cfg) as bar:
        def save(indices, texts):
            try:
                log.writelines(json.dumps({key: items[mine[i]][key], "text": t}) + "\n" for i, t in zip(indices, texts))
                log.flush()
            except OSError as e:
                raise M.disk_full_error(e, path)
            bar.update(len(indices))

        texts = generate_texts(model, [media_path(cfg, items[j]["image"], model.config.feature_dim > 0) for j in mine],
                               [prompts[j] for j in mine], generation_kwargs(cfg, family, model), cfg, save)
    return merge_predictions(gather_objects([(items[j][key], t) for j, t in zip(mine, texts)]))


def finish(predictions, what, cfg, world_size, write):
    """On rank 0, after the results are gathered: the readable predictions ({key: text}) and the count of unreadable
    files (each named in a warning when it was met). write(predictions) writes the results file; once it is
    written, the progress files go."""
    unreadable = [k for k, v in predictions.items() if v is None]
    if unreadable:
        print(f"skipped {len(unreadable)} {what}s whose file could not be read (scored as missing), "
              f"e.g. {unreadable[0]!r}")
    predictions = {k: v for k, v in predictions.items() if v is not None}
    write(predictions)
    for r in range(world_size):
        if os.path.exists(progress_file(cfg, r)):
            os.remove(progress_file(cfg, r))
    return predictions, len(unreadable)


def eval_vqa(model, questions, skipped, cfg, rank=0, world_size=1):
    """Answers for this rank's share of the questions; on rank 0 the metrics of all (None elsewhere)."""
    template = VQA_PROMPT if cfg["prompt"] is None else cfg["prompt"]
    if "{}" not in template:
        raise ValueError(f"VQA prompt {template!r} has no {{}} for the question")
    prompts = [template.format(M.clean_question(q["question"])) for q in questions]
    predictions = generate_all(model, questions, "question_id", prompts, "vqa", cfg, rank, world_size)
    if rank != 0:
        return None

    def write(answers):
        M.write_json(os.path.join(cfg["out_dir"], f"{cfg['task']}_answers.json"),
                     [{"question_id": q["question_id"], "answer": answers[q["question_id"]]}
                      for q in questions if q["question_id"] in answers], indent=1)
    predictions, unreadable = finish(predictions, "question", cfg, world_size, write)
    score = {"vqav2": M.vqa_scores, "okvqa": M.vqa_scores, "gqa": M.gqa_scores}.get(cfg["task"],
                                                                                   M.generic_vqa_scores)
    metrics = score(predictions, questions + skipped)  # skipped questions count as "missing"
    return {**metrics, "skipped_unreadable": unreadable} if unreadable else metrics


def eval_caption(model, items, skipped, cfg, rank=0, world_size=1):
    """Captions for this rank's share of the images; on rank 0 the metrics of all (None elsewhere)."""
    prompt = model.config.prompt if cfg["prompt"] is None else cfg["prompt"]
    predictions = generate_all(model, items, "image_id", [prompt] * len(items), "caption", cfg, rank, world_size)
    if rank != 0:
        return None

    def write(captions):
        M.write_coco_results(os.path.join(cfg["out_dir"], f"{cfg['task']}_captions.json"),
                             {it["image_id"]: captions[it["image_id"]] for it in items if it["image_id"] in captions})
    what = "video" if cfg["task"] in VIDEO_TASKS else "image"
    predictions, unreadable = finish(predictions, what, cfg, world_size, write)
    metrics = M.caption_metrics(predictions, {it["image_id"]: it["captions"] for it in items + skipped},
                                cfg["caption_scorers"])
    return {**metrics, "skipped_unreadable": unreadable} if unreadable else metrics

# -----------------------------------------------------------------------------
# retrieval: ITC for all pairs, ITM re-ranking of the top k
# As in LAVIS, every rank computes all the features (a text's ITM candidates can be any image); the ITM
# re-ranking, which is most of the work, is shared out by query, and its top-k rows are gathered on rank 0.


TEXT_BATCH = 256  # texts per Q-Former pass for the ITC text features


@torch.no_grad()
def retrieval_features(model, image_paths, texts, cfg):
    """Everything retrieval needs from a Blip2Stage1, for all images and texts: image_embeds (ln_vision of the
    ViT, for ITM), image_feats (n_img x Q x d), text ids / mask (for ITM) and text_feats (n_txt x d)."""
    device, dtype = cfg["device"], cfg["dtype"]
    ids, mask, text_feats = [], [], []
    for a in range(0, len(texts), TEXT_BATCH):
        i, m = model.tokenize(texts[a:a + TEXT_BATCH], device)
        with tc.autocast_context(device, dtype):
            text_feats.append(model.text_feats(i, m).float())
        ids.append(i)
        mask.append(m)
    embeds, image_feats = [], []
    store = torch.float32 if dtype == "float32" or not device.startswith("cuda") else tc.DTYPES[dtype]
    with progress("image features", len(image_paths), cfg) as bar:
        # an unreadable image would change the candidate set: an error, never a skip
        for images, _, _, _ in media_loader(image_paths, model, cfg, strict=True):
            with tc.autocast_context(device, dtype):
                e = model.image_embeds(images.to(device))[0]
                f = model.image_feats(model.qformer.encode_queries(e)[0])
            embeds.append(e.to(store))  # 5k x 257 x 1408 for COCO: kept in the autocast dtype on GPU
            image_feats.append(f.float())
            bar.update(len(images))
    return dict(image_embeds=torch.cat(embeds), image_feats=torch.cat(image_feats), ids=torch.cat(ids),
                mask=torch.cat(mask), text_feats=torch.cat(text_feats))


@torch.no_grad()
def coarse_scores(model, image_feats, text_feats, block=128):
    """ITC scores, n_img x n_txt: max over queries of the cosine, block images at a time (bounds the
    block x n_txt x Q intermediate)."""
    return torch.cat([model.similarity(image_feats[a:a + block], text_feats).float()
                      for a in range(0, len(image_feats), block)])


@torch.no_grad()
def itm_match_logits(model, image_embeds, ids, mask, batch_size, device="cpu", dtype="float32"):
    """ITM class-1 logits of the pairs (image_embeds[j], ids[j]), batch_size pairs per pass."""
    out = []
    for a in range(0, len(ids), batch_size):
        with tc.autocast_context(device, dtype):
            out.append(model.itm_logits(image_embeds[a:a + batch_size], ids[a:a + batch_size],
                                        mask[a:a + batch_size])[:, 1].float())
    return torch.cat(out)


@torch.no_grad()
def rerank_rows(model, feats, coarse, rows, direction, cfg):
    """ITM re-ranking of the queries `rows` of one direction ('i2t': rows are images, coarse is n_img x n_txt;
    't2i': rows are texts, coarse is n_txt x n_img). Returns (rows, candidate indices, scores), k per row:
    the top-k coarse candidates with score = ITM class-1 logit + coarse score."""
    rows = torch.as_tensor(list(rows), dtype=torch.long)
    k = min(cfg["k_test"], coarse.shape[1])
    embeds, ids, mask = feats["image_embeds"], feats["ids"], feats["mask"]
    if len(rows) == 0:
        return rows, torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    with progress(f"ITM re-ranking {direction}", len(rows), cfg) as bar:
        def itm_fn(q, idx):
            r = rows[q].item()
            if direction == "i2t":  # one image against its k candidate texts
                pairs = (embeds[r:r + 1].expand(len(idx), *embeds.shape[1:]), ids[idx], mask[idx])
            else:  # one text against its k candidate images
                pairs = (embeds[idx], ids[r:r + 1].expand(len(idx), -1), mask[r:r + 1].expand(len(idx), -1))
            bar.update()
            return itm_match_logits(model, *pairs, cfg["batch_size"], cfg["device"], cfg["dtype"])

        scores = M.itm_rerank(coarse[rows.to(coarse.device)], k, itm_fn)  # len(rows) x n, -inf outside the top k
    vals, idx = scores.topk(k, dim=1)
    return rows, idx.cpu(), vals.cpu()


def scores_from_parts(parts, shape):
    """A dense score matrix (-inf where nothing was re-ranked) from the ranks' (rows, indices, scores)."""
    out = torch.full(shape, float("-inf"))
    seen = torch.zeros(shape[0], dtype=torch.bool)
    for rows, idx, vals in parts:
        if seen[rows].any():
            raise RuntimeError("a retrieval query was re-ranked twice (sharding bug)")
        seen[rows] = True
        out[rows[:, None], idx] = vals
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} retrieval queries were not re-ranked (sharding bug)")
    return out


def retrieval_scores(model, feats, cfg, rank=0, world_size=1):
    """(scores_i2t, scores_t2i, coarse i2t) for retrieval_recall: each rank re-ranks every world_size-th query
    of both directions, the parts are gathered; the dense matrices on rank 0 (None elsewhere)."""
    coarse = coarse_scores(model, feats["image_feats"], feats["text_feats"])
    n_img, n_txt = coarse.shape
    i2t = rerank_rows(model, feats, coarse, range(rank, n_img, world_size), "i2t", cfg)
    t2i = rerank_rows(model, feats, coarse.t(), range(rank, n_txt, world_size), "t2i", cfg)
    parts = gather_objects((i2t, t2i))
    if rank != 0:
        return None
    return (scores_from_parts([p[0] for p in parts], (n_img, n_txt)),
            scores_from_parts([p[1] for p in parts], (n_txt, n_img)), coarse.cpu())


def eval_retrieval(model, data, cfg, rank=0, world_size=1):
    """TR@1/5/10 and IR@1/5/10 after ITM re-ranking (and ITC alone) on rank 0; None elsewhere."""
    images, texts, txt2img, img2txts = data
    texts = [clean_caption(t, max_words=30) for t in texts]  # LAVIS' pre_caption, as in training
    feats = retrieval_features(model, [os.path.join(cfg["image_root"], p) for p in images], texts, cfg)
    out = retrieval_scores(model, feats, cfg, rank, world_size)
    if rank != 0:
        return None
    scores_i2t, scores_t2i, coarse = out
    metrics = M.retrieval_recall(scores_i2t, scores_t2i, txt2img, img2txts)
    itc = M.retrieval_recall(coarse, coarse.t(), txt2img, img2txts)
    metrics.update({f"ITC {k}": v for k, v in itc.items()})
    metrics.update(images=len(images), texts=len(texts), k_test=min(cfg["k_test"], len(texts)))
    return metrics

# -----------------------------------------------------------------------------
# the run


def load_task(cfg):
    """The task's items, loaded and checked before the model (a wrong path fails before minutes of model loading):
    (items, items skipped for a missing file) for VQA and captioning, (data, []) for retrieval."""
    task = cfg["task"]
    if not cfg["ann_file"]:
        raise ValueError(f"task={task} needs ann_file (the annotation JSON)")
    family = TASK_FAMILY[task]
    if family == "retrieval":
        data = M.load_retrieval_limited(cfg["ann_file"], cfg["limit"])
        # a missing image would change the candidate set itself: always an error
        drop_missing_files([{"image": p} for p in data[0]], cfg, "image", "image", skippable=False)
        return data, []
    if family == "vqa":
        items = M.load_vqa_task(task, cfg["ann_file"], cfg["answers_file"], cfg["image_pattern"])
    else:
        items = M.load_caption_task(task, cfg["ann_file"])
    items = items[:cfg["limit"]] if cfg["limit"] else items
    key, what = ("question_id", "question") if family == "vqa" else \
        ("image_id", "video" if task in VIDEO_TASKS else "image")
    return drop_missing_files(items, cfg, key, what, reads_features(cfg))


def run(cfg):
    """Evaluate as cfg (DEFAULTS with changes) says. Returns the metrics on rank 0, None elsewhere."""
    task = cfg["task"]
    if task not in TASK_FAMILY:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASK_FAMILY)}")
    family = TASK_FAMILY[task]
    cfg = dict(cfg)
    for key, default in TASK_DATA[task].items():  # '' = the task's default files
        cfg[key] = cfg[key] or default
    d = setup_distributed(cfg["device"])
    items, skipped = load_task(cfg)
    model = load_model(cfg["ckpt"], cfg["hf"], d.device, cfg["model_overrides"], cfg["hf_dtype"])
    source = cfg["ckpt"] or cfg["hf"]
    wanted = Blip2Stage1 if family == "retrieval" else Blip2Stage2
    if not isinstance(model, wanted):
        raise ValueError(f"task={task} needs a {'stage-1' if family == 'retrieval' else 'stage-2'} model, "
                         f"{source} is a {type(model).__name__}")
    clip_frames(model, cfg)  # too many frames: an error now, not after the first batch
    os.makedirs(cfg["out_dir"], exist_ok=True)  # every rank writes its progress file there
    if d.master:
        print(f"{task}: {source} on {d.world_size} process(es), {cfg['ann_file']}")
    cfg["device"] = d.device
    t0 = time.time()
    evaluate = {"vqa": eval_vqa, "caption": eval_caption}.get(family)
    if evaluate is not None:
        metrics = evaluate(model, items, skipped, cfg, d.rank, d.world_size)
    else:
        metrics = eval_retrieval(model, items, cfg, d.rank, d.world_size)
    if not d.master:
        return None
    if skipped:
        metrics["skipped_missing_file"] = len(skipped)
    M.print_table(f"{task}: {source} ({time.time() - t0:.0f}s)", metrics)
    M.write_json(os.path.join(cfg["out_dir"], f"{task}_metrics.json"),
                 {"task": task, "source": source, "metrics": metrics, "config": cfg,
                  "provenance": M.provenance(d.device)}, indent=1)
    return metrics


if __name__ == "__main__":
    try:
        run(apply_overrides(dict(DEFAULTS), sys.argv[1:]))
    finally:
        cleanup_distributed()
