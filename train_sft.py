"""
Supervised training of video-SALMONN 2 (paper 3.2): audio-visual SFT with LoRA and the audio aligner,
and, in the toy world, the visual base (stage 0). Every setting and the loop are in training.py, shared
with train_align.py; the defaults there are this stage's.

$ python train_sft.py config/toy_sft.py                                          # one process (CPU or GPU)
$ torchrun --standalone --nproc_per_node=8 train_sft.py config/vs2_7b_sft.py     # one 8-GPU node
$ torchrun --nnodes=4 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER --master_port=29500 \\
      train_sft.py config/vs2_7b_sft.py                                          # 4 nodes, shared out_dir
$ python train_sft.py config/toy_sft.py --resume                                 # continue from out_dir/ckpt
"""
from config import configure, run
from training import *  # noqa: F403  the supervised stages' settings (overridable below and by configure) and the loop

if __name__ == "__main__":
    run(lambda argv: train(configure(globals(), argv), "sft"))  # noqa: F405
