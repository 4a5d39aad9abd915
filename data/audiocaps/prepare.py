"""
AudioCaps (Kim et al., NAACL 2019): 10 s AudioSet clips from YouTube, each with a human caption, the audio captioning
half of the audio alignment stage (paper 4.2). Licence: the captions are MIT (github.com/cdjkim/audiocaps); the audio
is YouTube's and is not distributed: you fetch it, and the clips gone from YouTube stay missing (counted and skipped).
Layout followed: the CSVs of github.com/cdjkim/audiocaps, dataset/{train,val,test}.csv with the columns
audiocap_id,youtube_id,start_time,caption (val and test: 5 rows, 5 captions, per clip), and the audio as the
audiocaps-download package (PyPI) writes it: {train,val,test}/<audiocap_id>.<wav|flac|ogg|mp3|m4a> beside them.

$ git clone https://github.com/cdjkim/audiocaps downloads/audiocaps-github
$ pip install audiocaps-download   # it runs yt-dlp and ffmpeg
$ python -c "from audiocaps_download import Downloader; Downloader('downloads/audiocaps', n_jobs=16).download(format='wav')"
$ cp downloads/audiocaps-github/dataset/*.csv downloads/audiocaps/
$ python data/audiocaps/prepare.py --root=downloads/audiocaps

Writes manifests/audiocaps_{train,val,test}.jsonl, one item a caption:
{"id": "97151", "audio": "../downloads/audiocaps/val/97151.wav", "task": "audio_caption",
 "prompt": "Please describe the audio.", "response": "Rustling occurs, ducks quack and water splashes, ..."}
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # data.py
from data import Skips, bad_layout, table_rows, write_manifest  # noqa: E402

PROMPT = "Please describe the audio."  # the authors' alignment prompt (their issue #9)
COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
SPLITS = ("train", "val", "test")
EXTENSIONS = ("wav", "flac", "ogg", "mp3", "m4a")  # the audio formats audiocaps-download writes


def main(argv=None):
    parser = argparse.ArgumentParser(description="AudioCaps -> audio captioning manifests for audio alignment")
    parser.add_argument("--root", required=True, help="folder with {train,val,test}.csv (or dataset/*.csv) and the audio")
    parser.add_argument("--out", default="manifests", help="folder of the manifests written")
    args = parser.parse_args(argv)
    tables = {s: p for s in SPLITS for p in (os.path.join(args.root, "dataset", f"{s}.csv"), os.path.join(args.root, f"{s}.csv"))
              if os.path.exists(p)}
    if not tables:
        bad_layout(f"{args.root}: expected the AudioCaps CSVs train.csv, val.csv, test.csv (github.com/cdjkim/audiocaps, "
                   "dataset/) with the audio in train/, val/, test/ as <audiocap_id>.wav (audiocaps-download)")
    skips, written = Skips(), 0
    for split, table in tables.items():
        items = []
        for n, row in table_rows(table, COLUMNS, skips):
            name, caption = row["audiocap_id"].strip(), row["caption"].strip()
            if not name or not caption:
                skips(f"{table}:{n}", "malformed row", "empty audiocap_id or caption")
                continue
            found = [p for e in EXTENSIONS if os.path.exists(p := os.path.join(args.root, split, f"{name}.{e}"))]
            if not found:
                skips(f"{table}:{n}", "missing audio", f"{split}/{name}.wav (or .flac, .ogg, .mp3, .m4a)")
                continue
            items.append({"id": name, "audio": found[0], "task": "audio_caption", "prompt": PROMPT, "response": caption})
        written += write_manifest(os.path.join(args.out, f"audiocaps_{split}.jsonl"), items)
    skips.summary("audiocaps", written)


if __name__ == "__main__":
    main()
