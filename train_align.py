"""
Audio modality alignment (paper 3.2): a parallel audio branch is added to the visual LLM and only the
audio aligner (window-level Q-Former, its query, the projections) trains, with cross-entropy on speech
recognition and audio captioning, so the visual LLM is untouched. The loop and the other settings are in
training.py, shared with train_sft.py.

$ python train_align.py config/toy_align.py
$ torchrun --standalone --nproc_per_node=8 train_align.py config/vs2_7b_align.py
$ python train_align.py config/toy_align.py --resume
"""
from config import configure, run
from training import *  # noqa: F403  the supervised stages' settings (what follows overrides them) and the loop

# -----------------------------------------------------------------------------
# what differs from SFT
train_data = "data/toyav/align_train.jsonl"  # audio-only items
val_data = "data/toyav/align_val.jsonl"
tasks = ("asr", "audio_caption")  # speech recognition and audio captioning
trainable = ("audio.",)  # the aligner only: Q-Former, its query, ln_speech, the projections
lora_r = 0  # no LoRA: the LLM stays as it is
out_dir = "out/align"
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    run(lambda argv: train(configure(globals(), argv), "align"))  # noqa: F405
