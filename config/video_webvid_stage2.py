# A Q-Former on raw frames, stage 2 on WebVid-style data: config/video_webvid_stage1.py's Q-Former in front of a frozen
# OPT-2.7b, 4 frames of 224 px, LM loss (add --pformer_ckpt=... for P-Former's alignment, weight 100).
#   torchrun --standalone --nproc_per_node=8 train_stage2.py config/video_webvid_stage2.py
#   python eval.py --task=msrvtt_qa --ckpt=out/video_webvid_stage2/ckpt.pt   # also msvd_qa, msrvtt_caption
out_dir = "out/video_webvid_stage2"
stage1_ckpt = "out/video_webvid_stage1/ckpt.pt"
train_ann = ["data/webvid/annotations/train.json"]
train_image_roots = ["data/webvid/videos"]
train_shards = ""
val_ann = ["data/msrvtt/annotations/cap_val.json"]
val_image_roots = ["data/msrvtt/videos"]
video = True
vit_dtype = "float16"
llm_model = "facebook/opt-2.7b"
llm_dtype = "float16"
batch_size = 32
max_steps = 20_000
lr_decay_steps = 20_000
warmup_steps = 2000
lr = 1e-4
min_lr = 1e-5
dtype = "bfloat16"
