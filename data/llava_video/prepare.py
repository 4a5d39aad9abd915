"""
LLaVA-Video-178K (Zhang et al., 2024; lmms-lab/LLaVA-Video-178K): 178k videos with GPT-4o detailed captions,
open-ended and multiple-choice questions; with FineVideo, the source of the audio-visual SFT set (paper 4.2: about 13k
videos "with rich audio information"). Licence: Apache-2.0 for the annotations (the dataset card), for academic
research and education only; the videos keep their sources' terms (YouTube, ActivityNet, Charades, Kinetics, ...).
Layout followed: one folder a subset (e.g. 0_30_s_academic_v0_1/) holding <subset>_cap_processed.json,
<prefix>_oe_v0_1_qa_processed.json and <prefix>_mc_v0_1_qa_processed.json (LLaVA lists of {"id", "conversations":
[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...], "data_source", "video"}) and
<subset>_videos_N.tar.gz archives that extract to the "video" paths, relative to the subset folder.

$ hf download lmms-lab/LLaVA-Video-178K --repo-type=dataset --local-dir=downloads/llava_video --include="0_30_s_*/*"   # one bucket; all: no --include
$ cd downloads/llava_video && for f in */*_videos_*.tar.gz; do tar xzf $f -C $(dirname $f); done; cd -
$ python data/llava_video/prepare.py --root=downloads/llava_video --min_audio=0.5
(hf is huggingface_hub's command line, installed by requirements-dev.txt)

Writes manifests/llava_video_{train,val}.jsonl (a hashed 1 % of the videos for validation), one item a question-answer
turn: task caption from the caption files, qa from the others; prompts and answers as released, <image> removed:
{"id": "0_30_s_academic_v0_1/Q04US", "video": "../downloads/llava_video/0_30_s_academic_v0_1/academic_source/Charades/Q04US.mp4",
 "task": "caption", "prompt": "Describe what is happening in the video in detail.", "response": "..."}
--min_audio keeps the videos whose audio is heard in at least that fraction of their seconds (data.audible_fraction;
0 keeps all; many academic sources have no audio track). Their atomic events for MrDPO come from eval.py --task=events.
"""
import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # data.py
from data import Skips, bad_layout, held_out, lacks_audio, write_manifest  # noqa: E402


def turns(conversations):
    """[(prompt, response)] of a LLaVA conversation: human and gpt turns alternating, <image> removed."""
    roles = [t["from"] for t in conversations]
    if not roles or roles != ["human", "gpt"] * (len(roles) // 2) or not all(isinstance(t["value"], str) for t in conversations):
        raise ValueError("human and gpt turns expected, alternating")
    return [(h["value"].replace("<image>", "").strip(), g["value"].strip()) for h, g in zip(conversations[::2], conversations[1::2])]


def main(argv=None):
    parser = argparse.ArgumentParser(description="LLaVA-Video-178K -> audio-visual SFT manifests (captions and QA)")
    parser.add_argument("--root", required=True, help="the hf download of lmms-lab/LLaVA-Video-178K, its archives extracted")
    parser.add_argument("--out", default="manifests", help="folder of the manifests written")
    parser.add_argument("--min_audio", type=float, default=0.5, help="least fraction of seconds with audio heard")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="videos held out for validation")
    args = parser.parse_args(argv)
    tables = sorted(glob.glob(os.path.join(args.root, "*", "*_processed.json")))
    if not tables:
        bad_layout(f"{args.root}: expected LLaVA-Video-178K subset folders (e.g. 0_30_s_academic_v0_1/) with "
                   "*_cap_processed.json and *_qa_processed.json, their *_videos_N.tar.gz extracted in place")
    skips, splits, checked = Skips(), {"train": [], "val": []}, {}  # checked: each video's lacks_audio, measured once
    for table in tables:
        subset, task = os.path.basename(os.path.dirname(table)), "caption" if table.endswith("_cap_processed.json") else "qa"
        try:
            rows = json.load(open(table, encoding="utf-8"))
        except ValueError as e:
            skips(table, "malformed file", str(e))
            continue
        for n, row in enumerate(rows if isinstance(rows, list) else []):
            where = f"{table}: item {n}"
            try:
                pairs, name = turns(row["conversations"]), f"{subset}/{row['id']}"
                video = os.path.join(os.path.dirname(table), row["video"])
            except (KeyError, TypeError, ValueError) as e:
                skips(where, "malformed item", str(e) or "id, conversations and video expected")
                continue
            if not os.path.exists(video):
                skips(where, "missing video", video)
                continue
            if video not in checked:
                checked[video] = lacks_audio(video, args.min_audio)
            if checked[video]:
                skips(where, *checked[video])
                continue
            items = splits["val" if held_out(row["video"], args.val_fraction) else "train"]
            items += [{"id": f"{name}_{k}" if k else name, "video": video, "task": task, "prompt": p, "response": r}
                      for k, (p, r) in enumerate(pairs)]
    written = sum(write_manifest(os.path.join(args.out, f"llava_video_{s}.jsonl"), its) for s, its in splits.items())
    skips.summary("llava_video", written)


if __name__ == "__main__":
    main()
