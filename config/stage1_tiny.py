# Stage 1 on the tiny world of world.py (run `python world.py` first), on CPU in well under a minute.
# Same code paths as the real run: a timm EVA checkpoint, a Hugging Face BERT directory, tiny sizes.
out_dir = "out/tiny/stage1"
train_ann = ["data/world/train.json"]
train_image_roots = ["data/world/images"]
val_ann = ["data/world/val.json"]
val_image_roots = ["data/world/images"]
num_workers = 0
# backbones written by world.py
vit_pretrained = "data/world/vit.pth"
vit_kwargs = dict(patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)
vit_layers = 2
vit_dtype = "float32"
image_size = 32
bert = "data/world/bert"
# a Q-Former of BERT's shape with the tiny BERT's sizes
num_query_tokens = 8
hidden_size = 64
num_layers = 2
num_heads = 4
intermediate_size = 128
embed_dim = 32
max_txt_len = 32
# training
batch_size = 16
max_steps = 60
lr_decay_steps = 60
warmup_steps = 10
lr = 1e-3
min_lr = 1e-4
log_interval = 10
eval_interval = 30
eval_batches = 1
ckpt_interval = 30
device = "cpu"
dtype = "float32"
