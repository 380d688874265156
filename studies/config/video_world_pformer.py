# P-Former stage 0 on the video world's text corpus (captions of clips that have no video), on CPU; run by
# python -m studies.video_world, which points the data paths below at its --data.
out_dir = "out/video_world/pformer"
train_text = ["data/video/corpus_captions.txt"]
val_text = ["data/video/test_captions.json"]
num_workers = 0
bert = "data/video/bert"
num_query_tokens = 8  # = the Q-Former's queries in video_world_stage*.py
hidden_size = 64
num_layers = 2
num_heads = 4
intermediate_size = 128
dropout = 0.0
embed_dim = 32
llm_model = "data/video/llm"
llm_dtype = "float32"
batch_size = 32
max_steps = 300
lr_decay_steps = 300
warmup_steps = 20
lr = 1e-3
min_lr = 1e-4
log_interval = 20
eval_interval = 1000
eval_batches = 2
ckpt_interval = 1000
device = "cpu"
dtype = "float32"
