# Stage 2 of studies/video_bridges.py on the video world: the bridge of studies/config/video_bridges_stage1.py (or,
# with --stage1_ckpt=, the BERT bridge straight from the world's BERT, as the VATEX baseline starts) in front of the
# world's frozen OPT, LM loss on captions (+ 100 x alignment with --pformer_ckpt, the image recipe; the study gives
# the BERT bridge the VATEX recipe's LM loss alone). No text prompt before the captions: the world's questions are
# asked after the soft prompt, as its LLM read a caption before each question in pretraining.
# The optimisation is config/video_world_stage2.py's.
#   python -m studies.video_bridges
out_dir = "out/video_bridges/qformer/blip2/seed0/stage2"
stage1_ckpt = "out/video_bridges/qformer/blip2/seed0/stage1/ckpt.pt"
train_ann = ["data/video/train.json"]
train_image_roots = ["data/video/features"]
val_ann = []
num_workers = 0
video = True
feature_dim = 64
num_frames = 8
augment = False
bridge = "qformer"
bert = "data/video/bert"  # the BERT bridge's frozen embedding block, and its start when stage1_ckpt is ''
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
