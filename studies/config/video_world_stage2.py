# Stage 2 on the video world (python -m studies.video_world runs it), after video_world_stage1.py (or from scratch
# with --stage1_ckpt=): the world's OPT, pretrained on its text, reads the soft prompt of each 4-frame clip.
out_dir = "out/video_world/stage2"
stage1_ckpt = "out/video_world/stage1/ckpt.pt"
train_ann = ["data/video/train.json"]
train_image_roots = ["data/video/videos"]
val_ann = []
num_workers = 0
video = True
num_frames = 4
augment = False
cache_vit_features = True  # the frozen ViT runs once per clip, not once per epoch
# the image encoder and Q-Former sizes, for the run from scratch; from a checkpoint, checked against it
vit_pretrained = "data/video/vit.pth"
vit_kwargs = dict(patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)
vit_layers = 2
vit_dtype = "float32"
image_size = 48
num_query_tokens = 8
hidden_size = 64
num_layers = 2
num_heads = 4
intermediate_size = 128
dropout = 0.0
llm_model = "data/video/llm"
llm_dtype = "float32"
batch_size = 32
max_steps = 600
lr_decay_steps = 600
warmup_steps = 20
lr = 3e-3
min_lr = 1e-4
log_interval = 20
eval_interval = 1000
ckpt_interval = 1000
device = "cpu"
dtype = "float32"
