"""
Caption a video with video-SALMONN 2 or 2+.

$ python caption.py --ckpt=DIR --video=FILE [--prompt="..."] [--greedy] [--audio=FILE.wav]
$ python caption.py --ckpt=DIR --video=FILE --fps=10 --max_frames=768      # a 2+ model, as released

DIR is a checkpoint in the released layout (config.json, model.safetensors, tokenizer.json), e.g. the
released tsinghua-ee/video-SALMONN-2, a 2+ release, or one written by our training scripts; its config.json
says which family it is. A video that cannot be
read, a checkpoint or tokenizer.json that is missing or cut short, prints one line naming it and exits
with status 2, before the model is loaded where it can.
"""
import torch

from checkpoint import load_model, model_config, trained_prompt
from config import UserError, configure, run
from data import chat_format, load_media, load_tokenizer

# -----------------------------------------------------------------------------
ckpt = ""  # checkpoint directory
tokenizer = ""  # tokenizer.json; empty: the one in ckpt
video = ""  # the video file
audio = ""  # a separate audio file (16 kHz or any rate PyAV reads); empty: the video's own audio
prompt = ""  # empty: the caption prompt the checkpoint was trained with (train_config.json), else the released one
greedy = False  # argmax decoding, as the released evaluation; else nucleus sampling
temperature = 1.0  # sampling temperature
top_p = 0.9  # nucleus mass, as the released MrDPO sampling
max_new_tokens = 1024  # caption length limit, as released
fps = 1.0  # frames per second sampled (2+: 10)
max_frames = 110  # a longer video gives this many frames spread over its length (2+: 768)
seed = 2024  # sampling seed
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
# -----------------------------------------------------------------------------


def main(argv):
    configure(globals(), argv)
    if not ckpt or not video:
        raise UserError("usage: python caption.py --ckpt=DIR --video=FILE [--prompt=...] [--greedy] (--help: all settings)")
    prep = model_config(ckpt)[1].media_prep(fps, max_frames)  # the family's preprocessing, from config.json
    # the video and the tokenizer before the model, so a bad file fails in a second, not after loading 16 GB
    media = load_media(video, audio or None, prep)
    tok = load_tokenizer(tokenizer or ckpt)
    model = load_model(ckpt, getattr(torch, dtype), device).eval()
    frames, mel = (None if t is None else t.to(device, getattr(torch, dtype)) for t in (media.frames, media.mel))
    feats = (*model.encode(frames, mel), media.times, media.duration)
    g = torch.Generator(device).manual_seed(seed)
    ids = model.sample(feats, chat_format(prep)[0](tok, prompt or trained_prompt(ckpt)), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, greedy=greedy, stop_ids=(tok.token_to_id("<|im_end|>"),),
                       generator=g)[0]
    print(tok.decode(ids, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    run(main)
