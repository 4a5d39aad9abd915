"""
The video-SALMONN 2 caption benchmark (paper 4.2 and Appendix E): 483 audio-visual videos of 30-60 s with human
captions and hand-refined atomic events, judged by an LLM for missed and hallucinated events (eval.py --task=captions;
train_mrdpo.py tests each round on it). Licence: Apache-2.0 (the dataset card). Layout followed: the Hugging Face
release tsinghua-ee/video-SALMONN_2_testset: video_salmonn2_test.json, a JSON list of
{"video": "0.mp4", "conversations": [{"from": "human", "value": "<image>\\nPROMPT"}, {"from": "gpt", "value": CAPTION}],
"events": [...]}, its eval.py (which matches predictions to items by "video"), and the videos, under video/ (the
layout other evaluations of it use) or beside the JSON; a zipped video folder must be unzipped first.

$ hf download tsinghua-ee/video-SALMONN_2_testset --repo-type=dataset --local-dir=downloads/vs2_testset
$ python data/vs2_testset/prepare.py --root=downloads/vs2_testset
(hf is huggingface_hub's command line, installed by requirements-dev.txt)

Writes manifests/caption_test.jsonl (config/vs2_7b_mrdpo.py's test_data), one item a video, its id the released name:
{"id": "0.mp4", "video": "../downloads/vs2_testset/video/0.mp4", "task": "caption", "prompt": PROMPT,
 "response": CAPTION, "events": ["...", ...]}
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # data.py
from data import Skips, bad_layout, write_manifest  # noqa: E402

RELEASE = "video_salmonn2_test.json"
VIDEO_DIRS = ("video", "")  # where the videos are looked for, relative to --root


def main(argv=None):
    parser = argparse.ArgumentParser(description="the video-SALMONN 2 caption test set -> the caption benchmark manifest")
    parser.add_argument("--root", required=True, help="the hf download of tsinghua-ee/video-SALMONN_2_testset")
    parser.add_argument("--out", default="manifests", help="folder of the manifest written")
    args = parser.parse_args(argv)
    release = os.path.join(args.root, RELEASE)
    try:
        rows = json.load(open(release, encoding="utf-8"))
    except (OSError, ValueError):
        rows = None
    if not isinstance(rows, list):
        bad_layout(f"{args.root}: expected {RELEASE}, a JSON list of {{video, conversations, events}} items "
                   "(tsinghua-ee/video-SALMONN_2_testset), with the videos under video/")
    skips, items = Skips(), []
    for n, row in enumerate(rows):
        where = f"{release}: item {n}"
        try:
            name, events, turns = row["video"], row["events"], row["conversations"]
            prompt = turns[0]["value"].replace("<image>", "").strip()
            caption = next((t["value"] for t in turns[1:] if t["from"] == "gpt"), "")
            if not (isinstance(name, str) and isinstance(events, list) and events and all(isinstance(e, str) for e in events)):
                raise TypeError
        except (KeyError, IndexError, TypeError, AttributeError):
            skips(where, "malformed item", "a video name, conversations and a list of event strings expected")
            continue
        video = next((p for d in VIDEO_DIRS if os.path.exists(p := os.path.join(args.root, d, name))), None)
        if video is None:
            skips(where, "missing video", os.path.join(args.root, VIDEO_DIRS[0], name))
            continue
        items.append({"id": name, "video": video, "task": "caption", "prompt": prompt, "response": caption, "events": events})
    skips.summary("vs2_testset", write_manifest(os.path.join(args.out, "caption_test.jsonl"), items))


if __name__ == "__main__":
    main()
