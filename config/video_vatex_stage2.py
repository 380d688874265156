# The P-Former paper's video recipe on VATEX captioning, stage 2: from config/video_vatex_stage1_pformer.py's
# checkpoint, the LM LOSS ONLY (no P-Former) through a frozen OPT-2.7b (its dropout on, as in the official runs), with
# the text prompt "a photo of" given before each caption. The authors' baseline is this stage alone, its bridge
# started from bert-base-uncased and llm_proj at random (--stage1_ckpt=). Same schedule as stage 1.
# Evaluate with (beam 5, 4-30 new tokens: the official min_length=8 counts the 4 tokens of BOS + "a photo of"):
#   python eval.py --task=vatex_caption --ckpt=out/video_vatex_stage2/ckpt.pt --min_new_tokens=4
#   python train_stage2.py config/video_vatex_stage2.py
out_dir = "out/video_vatex_stage2"
stage1_ckpt = "out/video_vatex_stage1_pformer/ckpt.pt"
train_ann = ["data/vatex/annotations/cap_train.json"]
train_image_roots = ["data/vatex/features"]
val_ann = ["data/vatex/annotations/cap_val.json"]
val_image_roots = ["data/vatex/features"]
video = True
feature_dim = 1024  # these three for the baseline from scratch; from a checkpoint, checked against it
num_frames = 32
bridge = "bert"
augment = False
llm_model = "facebook/opt-2.7b"
llm_dtype = "float16"
llm_dropout = True  # as the official runs
prompt = "a photo of"
batch_size = 128
max_steps = 20_300
lr_decay_steps = 20_300
lr_schedule = "epoch"
warmup_steps = 1000
warmup_start_lr = 1e-6
lr = 1e-4
min_lr = 1e-5
weight_decay = 0.05
betas = (0.9, 0.999)
dtype = "float16"
