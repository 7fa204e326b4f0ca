# The quick demo (python demo.py --quick=True), read after config/shapes.py:
#   python train.py config/shapes.py config/shapes_quick.py
# What the backbone learns is bounded by the images it sees, so a first result in minutes needs
# cheaper images, not fewer: at 32 px a float32 step takes about 0.6 of the 64 px one on AVX2 cores,
# and per minute of training 32 px gains more VOC mAP than 48 or 64 px (RESULTS.md, the quick demo).
image_size = 32         # the world's 64 px images, resized; layer4's grid is 1x1
max_iters = 1300        # 83k images, about half the demo's 160k
eval_interval = 1300    # one validation pass, at the end
ckpt_interval = 1300
