# Stage 1 of studies/video_bridges.py on the video world (world.py --video): each clip is its 8 frames' features
# (name.npy, 8 x 64: the frozen ViT's tokens mean-pooled per frame, extracted by the study), through a trainable
# Linear(64 -> 64) into the bridge. bridge="qformer": 8 queries cross-attend over the 8 frame features (a learned
# frame embedding on each), ITC + ITM + ITG as the image recipe (+ 10 x alignment with --pformer_ckpt).
# bridge="bert": the official video code's BERT encoder over the 8 positions, one soft prompt each (so num_frames =
# num_query_tokens), built from the world's BERT; the study gives it the VATEX recipe's stage 1, alignment alone
# (--stage1_losses=() --align_weight=100.0). Unlike config/video_vatex_stage1_pformer.py, no "a photo of " prefix:
# the world's P-Former and LLM read bare captions. The optimisation is config/video_world_stage1.py's.
#   python -m studies.video_bridges
out_dir = "out/video_bridges/qformer/blip2/seed0/stage1"
train_ann = ["data/video/train.json"]
train_image_roots = ["data/video/features"]  # name.npy for the annotations' name.mp4
val_ann = []
num_workers = 0
video = True
feature_dim = 64  # the world ViT's width (TINY_VIT's embed_dim)
num_frames = 8  # every frame of the world's clips: one feature segment each
augment = False
bridge = "qformer"
bert = "data/video/bert"
num_query_tokens = 8  # = the P-Former's prompts (config/video_world_pformer.py) = the BERT bridge's segments
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
