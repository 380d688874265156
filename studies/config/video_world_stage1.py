# Stage 1 on the video world (python -m studies.video_world runs it): clips of 8 frames of a shape moving left or
# right, 4 of them sampled per clip (uniformly: the frozen ViT's output is cached, so every epoch sees the same 4),
# through the frozen ViT frame by frame, a learned frame embedding on each frame's tokens, the queries over all 4
# frames; --num_frames=1 is the single-frame model. No flips: they would turn "left" into "right".
out_dir = "out/video_world/stage1"
train_ann = ["data/video/train.json"]
train_image_roots = ["data/video/videos"]
val_ann = []
num_workers = 0
video = True
num_frames = 4
augment = False
cache_vit_features = True  # the frozen ViT runs once per clip, not once per epoch
vit_pretrained = "data/video/vit.pth"
vit_kwargs = dict(patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)
vit_layers = 2
vit_dtype = "float32"
image_size = 48
bert = "data/video/bert"
num_query_tokens = 8
hidden_size = 64
num_layers = 2
num_heads = 4
intermediate_size = 128
dropout = 0.0
embed_dim = 32
batch_size = 32
max_steps = 150
lr_decay_steps = 150
warmup_steps = 20
lr = 1e-3
min_lr = 1e-4
log_interval = 20
eval_interval = 1000
ckpt_interval = 1000
device = "cpu"
dtype = "float32"
