# The P-Former paper's stage 0 (P-Former paper, sections 3 and 4): a BERT-base P-Former predicting 32 soft prompts for a
# frozen OPT-2.7b, from the captions of the 4M pairs, 5 epochs at a global batch of 384.
# torchrun --standalone --nproc_per_node=8 train_pformer.py config/pformer_opt2.7b_4m.py
out_dir = "out/pformer_opt2.7b_4m"
bert = "bert-base-uncased"
num_query_tokens = 32
mask_rate = 0.25
llm_model = "facebook/opt-2.7b"
llm_dtype = "float16"
llm_dropout = True  # as the official runs: their frozen OPT stays in train mode, its dropout (0.1) on
batch_size = 48  # x 8 GPUs = 384
grad_accum = 1
max_steps = 52_000  # ~5 epochs: 4M captions x 5 / 384
lr_decay_steps = 52_000
lr = 1e-4
min_lr = 1e-5
warmup_start_lr = 1e-6
warmup_steps = 2000
weight_decay = 0.05
dtype = "float16"
