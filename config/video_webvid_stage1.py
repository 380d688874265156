# A Q-Former on raw frames, stage 1 on WebVid-style data: 4 frames of 224 px per clip through the frozen EVA ViT-g
# (the same crop and flip for the 4), a learned frame embedding (zero at start) on each frame's tokens, the 32 queries
# cross-attending over all 4 x 257 tokens; ITC + ITM + ITG, started from an image stage-1 checkpoint (whose model it
# computes exactly until the frame embedding learns). Add --pformer_ckpt=... for P-Former's alignment.
#   torchrun --standalone --nproc_per_node=8 train_stage1.py config/video_webvid_stage1.py
out_dir = "out/video_webvid_stage1"
stage1_ckpt = "out/stage1_vitg_4m/ckpt.pt"  # an image stage 1; '' starts from bert-base-uncased
train_ann = ["data/webvid/annotations/train.json"]  # WebVid's {"videoid", "name"}: videoid.mp4, its caption
train_image_roots = ["data/webvid/videos"]
train_shards = ""  # or webdataset shards of key.mp4 + key.txt
val_ann = ["data/msrvtt/annotations/cap_val.json"]
val_image_roots = ["data/msrvtt/videos"]
video = True
num_frames = 4
image_size = 224
vit_dtype = "float16"
batch_size = 32  # x 8 GPUs: 4 frames per sample cost the ViT 4 images
max_steps = 20_000
lr_decay_steps = 20_000
warmup_steps = 2000
lr = 1e-4
min_lr = 1e-5
dtype = "bfloat16"
