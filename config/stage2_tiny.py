# Stage 2 on the tiny world of world.py, after config/stage1_tiny.py, on CPU in well under a minute. The image encoder
# and Q-Former sizes are stage 1's, from its checkpoint.
out_dir = "out/tiny/stage2"
stage1_ckpt = "out/tiny/stage1/ckpt.pt"
train_ann = ["data/world/train.json"]
train_image_roots = ["data/world/images"]
val_ann = ["data/world/val.json"]
val_image_roots = ["data/world/images"]
num_workers = 0
vit_dtype = "float32"
max_txt_len = 32
llm_model = "data/world/llm"  # a Hugging Face OPTForCausalLM directory, loaded like facebook/opt-2.7b
llm_dtype = "float32"
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
