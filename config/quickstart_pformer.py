# P-Former stage 0 of the quick start (quickstart.py) on the world's text-only caption corpus (many times the
# captions of the image-text pairs), through the world's pretrained LLM, on 2 CPU cores in about 2 minutes.
# 2000 steps: after 300 the LLM wrote nearly the same caption after the prompt of any sentence, so the alignment
# pulled every image toward one prompt.
out_dir = "out/quickstart/pformer"
train_text = ["data/quickstart/corpus_captions.txt"]
val_text = ["data/quickstart/test_captions.json"]
num_workers = 0
bert = "data/quickstart/bert"
num_query_tokens = 16  # = the Q-Former's queries in config/quickstart_stage1.py and quickstart_stage2.py
hidden_size = 128
num_layers = 4
num_heads = 4
intermediate_size = 256
dropout = 0.0
embed_dim = 64
max_txt_len = 32
llm_model = "data/quickstart/llm"
llm_dtype = "float32"
# the world's LLM read only pages of documents "</s> sentence \n": the soft prompt stands for a document (the
# caption), begins and ends as they do, in training and generation alike (without the "</s>" the LLM took a soft
# prompt for the middle of a caption and wrote on after the question)
llm_prompt_prefix = "</s>"
llm_prompt_suffix = "\n"
batch_size = 32
max_steps = 2000
lr_decay_steps = 2000
warmup_steps = 20
lr = 1e-3
min_lr = 1e-4
log_interval = 20
eval_interval = 400
eval_batches = 2
ckpt_interval = 200
device = "cpu"
dtype = "float32"
