# P-Former stage 0 on the captions of the tiny world of world.py (read without images), on CPU in seconds.
out_dir = "out/tiny/pformer"
train_text = ["data/world/train.json"]
val_text = ["data/world/val.json"]
num_workers = 0
bert = "data/world/bert"
num_query_tokens = 8  # = the Q-Former's queries in config/stage1_tiny.py and stage2_tiny.py
hidden_size = 64
num_layers = 2
num_heads = 4
intermediate_size = 128
embed_dim = 32
max_txt_len = 32
llm_model = "data/world/llm"
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
