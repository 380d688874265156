# The P-Former paper's stage 2 (P-Former paper, section 4: 4M pairs): the stage-1 Q-Former + llm_proj in front of a frozen
# OPT-2.7b (fp16), LM loss on 4M pairs, 10 epochs at a global batch of 1024.
# torchrun --standalone --nproc_per_node=8 train_stage2.py config/stage2_vitg_opt2.7b_4m.py
out_dir = "out/stage2_vitg_opt2.7b_4m"
stage1_ckpt = "out/stage1_vitg_4m/ckpt.pt"
vit_dtype = "float16"
llm_model = "facebook/opt-2.7b"
llm_dtype = "float16"
llm_dropout = True  # as the official runs: their frozen OPT stays in train mode, its dropout (0.1) on
batch_size = 128  # x 8 GPUs
grad_accum = 1
max_steps = 40_000
lr_decay_steps = 40_000
lr = 1e-4
min_lr = 1e-5
warmup_start_lr = 1e-6
warmup_steps = 2000
weight_decay = 0.05
dtype = "float16"
