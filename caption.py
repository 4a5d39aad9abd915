"""
Caption videos with video-SALMONN 2 or 2+: one file, a folder or a glob, many videos decoding together (engine.py).

$ python caption.py --ckpt=DIR --video=clip.mp4                          # prints the caption
$ python caption.py --ckpt=DIR --video=videos/ --out=captions.jsonl      # a folder (its video files, recursively)
$ python caption.py --ckpt=DIR --video="videos/*.mp4" --out=captions.jsonl --greedy
$ python caption.py --ckpt=DIR --video=clip.mp4 --fps=10 --max_frames=768      # a 2+ model, as released

Each video's line {"video", "caption", "seconds"} (seconds: from starting to read it to its caption's end) goes to
--out (else stdout; one video without --out prints its caption alone) as soon as its caption is done. Videos already
in --out are skipped, so running the same command again after a crash captions only the rest (a cut-off last line is
dropped). An unreadable video is named on stderr in one line and skipped, and the exit status is then 2; a single
video is read before the model loads, so a bad file fails in a second. DIR is a checkpoint in the released layout
(config.json, model.safetensors, tokenizer.json), e.g. the released tsinghua-ee/video-SALMONN-2, a 2+ release, or one
written by our training scripts; its config.json says which family it is. Sampling is seeded per video (the same `seed` for each), so a video gets the same caption alone, in
a folder, or after a resume.
"""
import glob
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import load_model, model_config, trained_prompt
from config import UserError, configure, run
from data import MediaError, chat_format, load_media, load_tokenizer, read_records

# -----------------------------------------------------------------------------
ckpt = ""  # checkpoint directory
tokenizer = ""  # tokenizer.json; empty: the one in ckpt
video = ""  # a video file, a folder (its video files, recursively) or a glob pattern
out = ""  # JSONL file the captions are appended to (and read back to resume); empty: stdout
audio = ""  # a separate audio file for a single video (16 kHz or any rate PyAV reads); empty: the video's own audio
prompt = ""  # empty: the caption prompt the checkpoint was trained with (train_config.json), else the released one
greedy = False  # argmax decoding, as the released evaluation; else nucleus sampling
temperature = 1.0  # sampling temperature
top_p = 0.9  # nucleus mass, as the released MrDPO sampling
max_new_tokens = 1024  # caption length limit, as released
fps = 1.0  # frames per second sampled (2+: 10)
max_frames = 110  # a longer video gives this many frames spread over its length (2+: 768)
seed = 2024  # sampling seed of every video
batch = 0  # captions decoding together (engine.py); 0: 8 on a CPU, on a GPU as many as its free memory holds
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
# -----------------------------------------------------------------------------
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts")


def list_videos(spec):
    """The videos a --video names: the file itself, a folder's video files (recursively), or a glob's matches."""
    if os.path.isdir(spec):
        return sorted(os.path.join(d, f) for d, _, files in os.walk(spec) for f in files
                      if f.lower().endswith(VIDEO_EXTENSIONS))
    if not os.path.exists(spec) and glob.has_magic(spec):
        return sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    return [spec]  # a file, or a missing one: named as unreadable when its turn comes


def main(argv):
    c = configure(globals(), argv)
    if not c["ckpt"] or not c["video"]:
        raise UserError("usage: python caption.py --ckpt=DIR --video=FILE|DIR|GLOB [--out=FILE.jsonl] [--greedy] "
                        "(--help: all settings)")
    videos = list_videos(c["video"])
    if not videos:
        raise UserError(f"--video={c['video']}: no video files there")
    if c["audio"] and len(videos) != 1:
        raise UserError(f"--audio={c['audio']}: goes with a single video, --video={c['video']} names {len(videos)}")
    done = {r["video"] for r in read_records(c["out"], {"video": str})} if c["out"] else set()
    todo = [v for v in videos if v not in done]
    prep = model_config(c["ckpt"])[1].media_prep(c["fps"], c["max_frames"])  # the family's preprocessing (config.json)
    started, bad = {}, []

    def read(i):  # the media of todo[i]; None when it cannot be read (named, counted), an error when it is the only one
        started[i] = time.time()
        try:
            return load_media(todo[i], c["audio"] or None, prep)
        except MediaError as e:
            if len(videos) == 1:
                raise
            bar.write(f"error: {e}", file=sys.stderr)
            bad.append(todo[i])
            bar.update(1)
            return None
    bar = tqdm(total=len(todo), unit="video", disable=None, desc="caption")  # a bar only on a terminal
    # the tokenizer and a single video before the model, so a bad file fails in a second, not after loading 16 GB
    first = read(0) if len(videos) == 1 and todo else None
    tok = load_tokenizer(c["tokenizer"] or c["ckpt"])
    dev = torch.device(c["device"])
    prompt_ids = chat_format(prep)[0](tok, c["prompt"] or trained_prompt(c["ckpt"]))  # before the model: a bad train_config.json fails in a second
    model = load_model(c["ckpt"], getattr(torch, c["dtype"]), dev).eval()
    stop = (tok.token_to_id("<|im_end|>"),)
    fed = []  # the todo index of each video the engine gets

    def examples():  # read lazily: a video is decoded and encoded when a row is free for it
        for i in range(len(todo)):
            media = first if i == 0 and first is not None else read(i)
            if media is not None:
                fed.append(i)
                yield (*model.encode(media.frames, media.mel), media.times, media.duration), prompt_ids
    generators = [torch.Generator(dev).manual_seed(c["seed"]) for _ in todo]  # indexed by the order videos are fed
    sink = open(c["out"], "a", encoding="utf-8") if c["out"] else sys.stdout
    try:
        for k, (ids,) in model.stream(examples(), generators=generators, batch=c["batch"], max_new_tokens=c["max_new_tokens"],
                                      temperature=c["temperature"], top_p=c["top_p"], greedy=c["greedy"], stop_ids=stop):
            i = fed[k]
            text = tok.decode(ids, skip_special_tokens=True).strip()
            record = {"video": todo[i], "caption": text, "seconds": round(time.time() - started[i], 2)}
            sink.write(text + "\n" if len(videos) == 1 and not c["out"] else json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            bar.update(1)
    finally:
        bar.close()
        if sink is not sys.stdout:
            sink.close()
    return 2 if bad else 0


if __name__ == "__main__":
    run(main)
