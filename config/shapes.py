# The CPU demo: pretrain on the built-in shapes world (python data/shapes/prepare.py) in minutes.
# The paper's model and objective (bicaptioning, post-norm L1 decoders, tied embeddings, LookAhead,
# warmup then cosine), with what a CPU-sized run forces and four departures that make the image
# matter: undoing the init, the dropout and the slower head together leaves the image unused.
# RESULTS.md (the head study) measures each, undone one at a time.
data_root = 'data/shapes/coco'
# python tokenizer.py ... --vocab_size=256 (65 distinct words)
tokenizer = 'data/shapes/vocab.model'
out_dir = 'out/shapes'
visual = 'resnet18'     # small enough for a CPU; 512-d features for the SVMs
n_layer = 1
n_embd = 256            # H; a 65-word world needs little textual capacity
n_head = 4              # H / 64, as in the paper's configs
zero_init_residual = False  # the layer4 grid is 2x2 at 64 px: see VirTex.__init__ in model.py
image_size = 64         # the shapes world is drawn at 64 px
# the paper's per-matrix gain at H=256 (model.py, init_textual_weights)
init_std = 0.0566       # 0.02 * sqrt(2048 / 256)
dropout = 0.0           # dropout slows a short run's head
# Random crops and colour jitter change what the captions say (a cropped-away shape, a recoloured
# one): with positions and colours in the captions they turn targets into noise (not measured).
min_crop_scale = 1.0
color_jitter = 0.0
batch_size = 64         # CPU-sized batches
# 16 epochs of the 10k images; fewer images seen cost mAP (RESULTS.md, the recipe)
max_iters = 2500
warmup_iters = 50
# AdamW, still inside LookAhead, moves the backbone further in a short run than the paper's SGD; the
# head needs a slower step than the backbone once its init is larger.
optimizer = 'adamw'
cnn_lr = 2e-3
lr = 5e-4
weight_decay = 0.01     # AdamW's decoupled decay; the paper's 1e-4 was for SGD
num_workers = 1         # 2 cores: one decodes images while the other trains
eval_interval = 500
eval_iters = 8
ckpt_interval = 500
log_interval = 50
# dtype is train.py's 'auto': bfloat16 autocast where the CPU multiplies it natively (AVX512-BF16,
# AMX), float32 elsewhere.
