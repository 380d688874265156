"""
BLIP-2 stage 1: vision-language representation learning. The frozen image encoder's features go through the
trainable ln_vision and Q-Former, trained on image-text pairs with ITC + ITM + ITG.

One GPU or CPU:       python train_stage1.py config/stage1_tiny.py
One node, 8 GPUs:     torchrun --standalone --nproc_per_node=8 train_stage1.py config/stage1_vitg_4m.py
Override anything:    python train_stage1.py config/stage1_tiny.py --batch_size=8 --max_steps=50
"""
import sys

import torch

import train_common as tc
from checkpoints import pformer_from_checkpoint, read_checkpoint
from configurator import apply_overrides, config_snapshot
from data import image_text_loader
from distributed import cleanup_distributed, setup_distributed
from backbones import load_weights
from model import Blip2Config, Blip2Stage1
from pretrained import init_from_bert, init_llm_proj_from_blip2

# -----------------------------------------------------------------------------
# default config: the P-Former paper's stage 1 on 4M pairs (COCO + VG + CC3M + SBU), ViT-g, batch 8 x 128
# I/O
out_dir = "out/stage1"
init_from = "scratch"  # 'scratch' or 'resume' (continue from out_dir/ckpt.pt)
overwrite = False  # True: a run from scratch may replace the checkpoint of an earlier run in out_dir
resume_changes = False  # True: init_from=resume may change settings that change the run (seed, data, lr, ...)
log_interval = 50
eval_interval = 2000
eval_batches = 50
ckpt_interval = 1000
wandb_log = False
wandb_project = "blip2-pformer"
wandb_run_name = "stage1"
# data: LAVIS-style caption annotations (JSON list or JSONL) and their image folders, or tar shards
train_ann = ["data/coco/annotations/coco_karpathy_train.json", "data/vg/annotations/vg_caption.json",
             "data/cc3m/annotations/cc3m.json", "data/sbu/annotations/sbu.json"]
train_image_roots = ["data/coco/images", "data/vg/images", "data/cc3m/images", "data/sbu/images"]
train_shards = ""  # e.g. "data/laion/{00000..09999}.tar" (img2dataset layout); used instead of train_ann if set
val_ann = ["data/coco/annotations/coco_karpathy_val.json"]
val_image_roots = ["data/coco/images"]
strict_images = False  # True: an unreadable image stops the run; False: skipped with a warning and counted
num_workers = 8
augment = True  # BLIP-2's random crop + flip; False: the evaluation resize (scenes whose captions name positions)
cache_vit_features = False  # with augment=False: the frozen ViT runs once per image, its output kept in memory
# clips (the P-Former paper shows the method on video): the annotation files or shards hold videos, the roots too
video = False  # True: LAVIS video captions (MSRVTT / MSVD / VATEX / WebVid), or tar shards of key.mp4 + key.txt
num_frames = 1  # frames per clip (feature segments with feature_dim); > 1 adds a learned frame embedding
feature_dim = 0  # > 0: pre-extracted clip features (root/name.npy, S x feature_dim) read instead of videos
# P-Former alignment (P-Former paper, section 3): a stage-0 checkpoint of train_pformer.py; "" = plain BLIP-2
pformer_ckpt = ""
align_weight = 10.0  # the paper's weight in stage 1
align_prefix = ""  # text before each caption for the P-Former's target (the video recipe: "a photo of ")
stage1_losses = ("itc", "itm", "itg")  # () with a P-Former: alignment only (the paper's video recipe)
pformer_dropout = False  # True: the teacher's dropout is on in training, as the official video runs leave it
llm_proj_init = ""  # with a P-Former: llm_proj starts as this official BLIP-2's (HF format, Salesforce/blip2-opt-2.7b)
stage1_ckpt = ""  # start from a stage-1 checkpoint (e.g. an image model, for clips) instead of bert
# model (the names of model.Blip2Config)
vit_model = "eva_giant_patch14_clip_224"
vit_layers = 39
vit_pretrained = "timm"
vit_kwargs = {}
vit_dtype = "float16"
image_size = 224
bert = "bert-base-uncased"
qformer_init_from_bert = True  # the Q-Former's self-attention and FFNs (and the ITG head) start as BERT's
bridge = "qformer"  # "bert" (clip features): the official video code's BERT encoder over the segments, built from bert
num_query_tokens = 32
cross_attention_freq = 2
hidden_size = 768
num_layers = 12
num_heads = 12
intermediate_size = 3072
dropout = 0.1
embed_dim = 256
max_txt_len = 32
same_image_positives = True  # captions of one image in a batch: ITC positives, never ITM negatives (False: the papers)
# optimization: AdamW, linear warmup then cosine, as the official runs
batch_size = 128  # per GPU and micro-step; global batch = batch_size * grad_accum * GPUs
grad_accum = 1
max_steps = 40_000  # about 10 epochs of 4M pairs at a global batch of 1024
lr_decay_steps = 40_000  # the cosine reaches min_lr here; normally = max_steps (a smaller max_steps stops early)
lr = 1e-4
min_lr = 1e-5
warmup_start_lr = 1e-6
warmup_steps = 5000
weight_decay = 0.05
betas = (0.9, 0.98)
lr_schedule = "step"  # 'step': warmup, then a cosine over lr_decay_steps; 'epoch': LAVIS's, one value per epoch
grad_clip = 0.0  # 0 = off, as in the official runs
# system
device = "cuda"
dtype = "bfloat16"  # autocast on CUDA: 'bfloat16' or 'float16' (with a GradScaler); CPU runs in float32
compile = False
seed = 1337
# -----------------------------------------------------------------------------
apply_overrides(globals(), sys.argv[1:])
config = config_snapshot(globals())
tc.check_config(config)
# -----------------------------------------------------------------------------

dist_info = setup_distributed(device)
tc.seed_everything(seed)  # the same model on every rank

pformer = None
if pformer_ckpt:  # the frozen teacher of the alignment loss
    pformer = pformer_from_checkpoint(read_checkpoint(pformer_ckpt, expect_stage=0), pformer_ckpt)
model = Blip2Stage1(Blip2Config.pick(config), pformer=pformer)
if init_from == "scratch" and stage1_ckpt:  # e.g. an image model's, for clips
    load_weights(model, read_checkpoint(stage1_ckpt, expect_stage=1)["model"], stage1_ckpt,
                 required=model.required_weights())
elif qformer_init_from_bert and init_from == "scratch":
    init_from_bert(model, bert)
if llm_proj_init and init_from == "scratch" and not stage1_ckpt:
    if model.llm_proj is None:
        raise ValueError("llm_proj_init: stage 1 has an llm_proj only when it aligns to a P-Former (pformer_ckpt)")
    init_llm_proj_from_blip2(model, llm_proj_init)
model.to(dist_info.device)
if dist_info.master:
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"stage 1: {n_trainable / 1e6:.1f}M trainable parameters")

if cache_vit_features and augment:
    raise ValueError("cache_vit_features=True needs augment=False: augmented images differ at every epoch")
encode = (lambda images: model.visual(images.to(dist_info.device))) if cache_vit_features else None
media = dict(video=video or feature_dim > 0, num_frames=num_frames, feature_dim=feature_dim)
train_loader = image_text_loader(train_ann, train_image_roots, train_shards, batch_size, num_workers, image_size,
                                 augment=augment, seed=seed, strict=strict_images, encode=encode, **media)
val_loader = image_text_loader(val_ann, val_image_roots, "", batch_size, num_workers, image_size, train=False,
                               seed=seed, strict=strict_images, **media) if val_ann else None

# ITM negatives come from one generator seeded alike on every rank: the draw is then the same whatever the
# number of GPUs (model.Blip2Stage1.itm_loss takes its own rows of the global draw)
negatives = torch.Generator(dist_info.device).manual_seed(seed)


def loss_fn(model, batch):
    frame_mask = batch["frame_mask"].to(dist_info.device, non_blocking=True) if "frame_mask" in batch else None
    return model(batch["image"].to(dist_info.device, non_blocking=True), batch["text"], image_ids=batch["image_id"],
                 frame_mask=frame_mask, neg_generator=negatives)


tc.train(model=model, loss_fn=loss_fn, loader=train_loader, val_loader=val_loader, cfg=config, dist_info=dist_info,
         stage=1, generators={"itm_negatives": negatives})
cleanup_distributed()
