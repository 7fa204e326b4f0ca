# The CPU demo: pretrain on the built-in shapes world (python data/shapes/prepare.py) in minutes.
# Each value says why it differs from the paper's default in train.py.
data_root = 'data/shapes/coco'
tokenizer = 'data/shapes/vocab.model'   # python tokenizer.py ... --vocab_size=256 (65 distinct words)
out_dir = 'out/shapes'
visual = 'resnet18'     # small enough for a CPU; 512-d features for the SVMs
n_layer = 1
n_embd = 256            # H; a 65-word world needs little textual capacity
n_head = 4              # H / 64, as in the paper's configs
zero_init_residual = False  # at 64 px identity-initialised blocks keep the caption loss from the convolutions
image_size = 64         # the shapes world is drawn at 64 px
batch_size = 64         # CPU-sized batches
max_iters = 1500        # about 10 epochs of the 10k training images
warmup_iters = 100
cnn_lr = 1.0            # a short run needs a faster backbone (paper 0.2): +2.4 mAP in a 600-iteration test
lr = 0.2                # the paper's 0.001 needs 500k iterations; a short run needs a faster head
num_workers = 1         # 2 cores: one decodes images while the other trains
eval_interval = 500
eval_iters = 8
ckpt_interval = 500
log_interval = 50
