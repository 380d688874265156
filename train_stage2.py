"""
BLIP-2 stage 2: vision-to-language generative learning. The stage-1 Q-Former's query outputs, projected by
llm_proj, become a soft prompt of 32 vectors in front of the frozen LLM, trained with the LM loss on captions.

One GPU or CPU:       python train_stage2.py config/stage2_tiny.py
One node, 8 GPUs:     torchrun --standalone --nproc_per_node=8 train_stage2.py config/stage2_vitg_opt2.7b_4m.py
Override anything:    python train_stage2.py config/stage2_tiny.py --stage1_ckpt=out/stage1/ckpt.pt
"""
import os
import sys

import train_common as tc
from checkpoints import pformer_from_checkpoint, read_checkpoint, take_model_sizes
from configurator import apply_overrides, config_snapshot
from data import image_text_loader
from distributed import cleanup_distributed, setup_distributed
from model import Blip2Config, Blip2Stage2
from pretrained import init_llm_proj_from_blip2

# -----------------------------------------------------------------------------
# default config: the P-Former paper's stage 2 on 4M pairs, ViT-g + OPT-2.7b, batch 8 x 128
# I/O
out_dir = "out/stage2"
init_from = "scratch"  # 'scratch' (start from stage1_ckpt) or 'resume' (continue from out_dir/ckpt.pt)
overwrite = False  # True: a run from scratch may replace the checkpoint of an earlier run in out_dir
resume_changes = False  # True: init_from=resume may change settings that change the run (seed, data, lr, ...)
stage1_ckpt = "out/stage1/ckpt.pt"  # '' starts the Q-Former from random weights (an ablation)
log_interval = 50
eval_interval = 2000
eval_batches = 50
ckpt_interval = 1000
wandb_log = False
wandb_project = "blip2-pformer"
wandb_run_name = "stage2"
# data: as in stage 1
train_ann = ["data/coco/annotations/coco_karpathy_train.json", "data/vg/annotations/vg_caption.json",
             "data/cc3m/annotations/cc3m.json", "data/sbu/annotations/sbu.json"]
train_image_roots = ["data/coco/images", "data/vg/images", "data/cc3m/images", "data/sbu/images"]
train_shards = ""
val_ann = ["data/coco/annotations/coco_karpathy_val.json"]
val_image_roots = ["data/coco/images"]
strict_images = False
num_workers = 8
augment = True  # BLIP-2's random crop + flip; False: the evaluation resize (scenes whose captions name positions)
cache_vit_features = False  # with augment=False: the frozen ViT runs once per image, its output kept in memory
# clips (the P-Former paper shows the method on video): the annotation files or shards hold videos, the roots too
video = False  # True: LAVIS video captions (MSRVTT / MSVD / VATEX / WebVid), or tar shards of key.mp4 + key.txt
num_frames = None  # frames per clip (feature segments with feature_dim); > 1 adds a learned frame embedding; may
# differ from stage 1's (a clip model started from an image model)
feature_dim = None  # > 0: pre-extracted clip features (root/name.npy, S x feature_dim) read instead of videos
# P-Former alignment (P-Former paper, section 3): a stage-0 checkpoint of train_pformer.py; "" = plain BLIP-2
pformer_ckpt = ""
align_weight = 100.0  # the paper's weight in stage 2
align_prefix = ""  # text before each caption for the P-Former's target (the video recipe: "a photo of ")
pformer_dropout = False  # True: the teacher's dropout is on in training, as the official video runs leave it
llm_proj_init = ""  # with stage1_ckpt='': llm_proj starts as this official BLIP-2's (HF format), not at random
# model (the names of model.Blip2Config). None: the model's of the checkpoint the run starts from (stage1_ckpt, or
# out_dir/ckpt.pt when it resumes), or with stage1_ckpt='' Blip2Config's (ViT-g, a BERT-base Q-Former of 32 queries).
# A size given that contradicts the checkpoint is an error (checkpoints.take_model_sizes).
vit_model = None
vit_layers = None
vit_pretrained = None  # may differ from stage 1's: the same weights elsewhere on this machine
vit_kwargs = None
vit_dtype = "float16"
image_size = None
bridge = None  # "bert" (clip features): the official video code's BERT encoder over the segments, built from bert
bert = None  # the BERT bridge's weights when stage1_ckpt is '' (as the official baseline), and its frozen embedding
# block always
num_query_tokens = None
cross_attention_freq = None
hidden_size = None
num_layers = None
num_heads = None
intermediate_size = None
dropout = 0.1
max_txt_len = 32
llm_model = "facebook/opt-2.7b"  # any HF causal LM (OPT, Llama-family) or FlanT5, by name or directory
llm_dtype = "float16"  # FlanT5: 'bfloat16'
llm_dropout = False  # True: OPT's own dropout (0.1) on in the LM loss, as the official code leaves it (train mode)
prompt = ""  # e.g. "a photo of": given before each caption, not learned (caption fine-tuning)
llm_prompt_prefix = ""  # text before the soft prompt, in training and generation (the quick start: "</s>")
llm_prompt_suffix = ""  # text after the soft prompt, before BOS, in training and generation (the quick start: "\n")
t5_prefix_split = False
# optimization
batch_size = 128
grad_accum = 1
max_steps = 40_000
lr_decay_steps = 40_000  # the cosine reaches min_lr here; normally = max_steps (a smaller max_steps stops early)
lr = 1e-4
min_lr = 1e-5
warmup_start_lr = 1e-6
warmup_steps = 2000
weight_decay = 0.05
betas = (0.9, 0.98)
lr_schedule = "step"  # 'step': warmup, then a cosine over lr_decay_steps; 'epoch': LAVIS's, one value per epoch
grad_clip = 0.0
# system
device = "cuda"
dtype = "bfloat16"
compile = False
seed = 1337
# -----------------------------------------------------------------------------
apply_overrides(globals(), sys.argv[1:])
take_model_sizes(globals(), stage1_ckpt if init_from != "resume" else os.path.join(out_dir, "ckpt.pt"))
config = config_snapshot(globals())
tc.check_config(config)
# -----------------------------------------------------------------------------

dist_info = setup_distributed(device)
tc.seed_everything(seed)  # the same model on every rank

pformer = None
if pformer_ckpt:  # the frozen teacher of the alignment loss
    pformer = pformer_from_checkpoint(read_checkpoint(pformer_ckpt, expect_stage=0), pformer_ckpt)
model = Blip2Stage2(Blip2Config.pick(config), pformer=pformer)
if init_from == "scratch" and stage1_ckpt:
    model.load_stage1(read_checkpoint(stage1_ckpt, expect_stage=1)["model"], stage1_ckpt)
elif init_from == "scratch":
    if llm_proj_init:
        init_llm_proj_from_blip2(model, llm_proj_init)
    if dist_info.master:
        start = f"BERT bridge starts from {bert}" if bridge == "bert" else "Q-Former starts from random weights"
        print(f"stage1_ckpt is empty: the {start}")
model.to(dist_info.device)
if dist_info.master:
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"stage 2: {n_trainable / 1e6:.1f}M trainable parameters, LLM {llm_model}")

if cache_vit_features and augment:
    raise ValueError("cache_vit_features=True needs augment=False: augmented images differ at every epoch")
encode = (lambda images: model.visual(images.to(dist_info.device))) if cache_vit_features else None
media = dict(video=video or feature_dim > 0, num_frames=num_frames, feature_dim=feature_dim)
train_loader = image_text_loader(train_ann, train_image_roots, train_shards, batch_size, num_workers, image_size,
                                 augment=augment, seed=seed, strict=strict_images, encode=encode, **media)
val_loader = image_text_loader(val_ann, val_image_roots, "", batch_size, num_workers, image_size, train=False,
                               seed=seed, strict=strict_images, **media) if val_ann else None


def loss_fn(model, batch):
    frame_mask = batch["frame_mask"].to(dist_info.device, non_blocking=True) if "frame_mask" in batch else None
    return model(batch["image"].to(dist_info.device, non_blocking=True), batch["text"], frame_mask=frame_mask)


tc.train(model=model, loss_fn=loss_fn, loader=train_loader, val_loader=val_loader, cfg=config, dist_info=dist_info,
         stage=2)
cleanup_distributed()
