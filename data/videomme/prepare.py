"""
Video-MME (Fu et al., 2024): 900 videos, 2,700 four-way multiple-choice questions, a third each of short (< 2 min),
medium (4-15 min) and long (30-60 min) videos, asked without and with the videos' subtitles (paper Tables 2 and 4).
Licence: academic research only, no commercial use (video-mme.github.io). Layout followed: the Hugging Face copy
lmms-lab/Video-MME that lmms-eval reads: videomme/test-00000-of-00001.parquet with the columns video_id, duration
("short" | "medium" | "long"), domain, sub_category, url, videoID, question_id, task_type, question, options
(["A. ...", "B. ...", "C. ...", "D. ..."]) and answer ("A"-"D"); videos_chunked_NN.zip extracting to data/<videoID>.mp4
and subtitle.zip to subtitle/<videoID>.srt. Parquet is read with pyarrow (requirements-data.txt).

$ hf download lmms-lab/Video-MME --repo-type=dataset --local-dir=downloads/videomme
$ cd downloads/videomme && for f in videos_chunked_*.zip subtitle.zip; do unzip -q -o $f; done; cd -
$ pip install -r requirements-data.txt
$ python data/videomme/prepare.py --root=downloads/videomme
(hf is huggingface_hub's command line, installed by requirements-dev.txt)

Writes manifests/videomme.jsonl (without subtitles: eval.py builds the Video-MME prompt from question and options) and
manifests/videomme_subs.jsonl (with them: the prompt lists the subtitles shown at the frames the model samples, 1 fps
and at most 110 frames as data.py, as Video-MME pairs subtitles with sampled frames), one item a question:
{"id": "001-1", "video": "../downloads/videomme/data/fFjv93ACGo8.mp4", "question": "...", "options": ["A. ...", ...],
 "answer": "C", "duration": "short", "domain": "...", "sub_category": "...", "task_type": "..."}
eval.py --task=qa reports the accuracy over all items and for each duration class.
"""
import argparse
import glob
import os
import re
import sys

import av

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # data.py
from data import Skips, bad_layout, sample_frame_indices, write_manifest  # noqa: E402

try:
    import pyarrow.parquet as pq
except ImportError:
    raise SystemExit("data/videomme/prepare.py reads Parquet with pyarrow: pip install -r requirements-data.txt")

COLUMNS = ("videoID", "question_id", "duration", "question", "options", "answer")  # those read; the others are kept as they are
KEPT = ("domain", "sub_category", "task_type")
SUBS_PROMPT = ("This video's subtitles are listed below:\n{subtitles}\nSelect the best answer to the following multiple-choice "
               "question based on the video and the subtitles. Respond with only the letter (A, B, C, or D) of the correct "
               "option.\n{question}\n{options}\nThe best answer is:")  # Video-MME's prompt with subtitles


def seconds(stamp):  # "00:01:02,500" -> 62.5
    h, m, s = stamp.strip().replace(",", ".").split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def cues(path):
    """[(start s, end s, text)] of an .srt file, without the <font> tags of Video-MME's subtitles."""
    out = []
    for block in re.split(r"\n\s*\n", open(path, encoding="utf-8-sig", errors="replace").read().strip()):
        lines = block.strip().splitlines()
        if (i := next((k for k, line in enumerate(lines) if "-->" in line), None)) is not None:
            start, end = (seconds(t) for t in lines[i].split("-->"))
            out.append((start, end, re.sub(r"<[^>]+>", "", " ".join(lines[i + 1:])).strip()))
    return out


def frame_times(path):
    """The seconds of the frames the model takes from a video (data.py's sampling at its defaults)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate)
        n = stream.frames or round(container.duration / av.time_base * rate)
    return [i / rate for i in sample_frame_indices(n, rate)]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Video-MME -> multiple-choice manifests without and with subtitles")
    parser.add_argument("--root", required=True, help="the hf download of lmms-lab/Video-MME, its zips extracted")
    parser.add_argument("--out", default="manifests", help="folder of the manifests written")
    args = parser.parse_args(argv)
    tables = sorted(glob.glob(os.path.join(args.root, "videomme", "test-*.parquet")))
    if not tables or not os.path.isdir(os.path.join(args.root, "data")):
        bad_layout(f"{args.root}: expected videomme/test-*.parquet and the videos in data/<videoID>.mp4 (lmms-lab/Video-MME "
                   "with videos_chunked_*.zip and subtitle.zip extracted)")
    skips, plain, subbed, seen = Skips(), [], [], {}  # seen: a video's frame times
    for table in tables:
        header = pq.read_schema(table).names
        if missing := [c for c in COLUMNS if c not in header]:
            bad_layout(f"{table}: expected the columns {', '.join(COLUMNS)}; it has no {', '.join(missing)}")
        if extra := [c for c in header if c not in COLUMNS + KEPT + ("video_id", "url")]:
            print(f"{table}: columns not read: {', '.join(extra)}")
        for n, row in enumerate(pq.read_table(table).to_pylist()):
            where, options = f"{table}: row {n}", row["options"]
            if (row["duration"] not in ("short", "medium", "long") or row["answer"] not in ("A", "B", "C", "D")
                    or not isinstance(options, list) or [o[:3] for o in options] != ["A. ", "B. ", "C. ", "D. "]):
                skips(where, "malformed row", "duration short/medium/long, answer A-D and options 'A. '-'D. ' expected")
                continue
            video = os.path.join(args.root, "data", f"{row['videoID']}.mp4")
            if not os.path.exists(video):
                skips(where, "missing video", video)
                continue
            item = {"id": row["question_id"], "video": video, "question": row["question"], "options": options,
                    "answer": row["answer"], "duration": row["duration"], **{k: row.get(k) for k in KEPT}}
            plain.append(item)
            srt = os.path.join(args.root, "subtitle", f"{row['videoID']}.srt")
            try:
                times = seen[video] = seen.get(video) or frame_times(video)
                shown = [c for c in cues(srt) if any(c[0] <= t < c[1] for t in times)] if os.path.exists(srt) else None
            except (ValueError, IndexError, TypeError, av.error.FFmpegError) as e:
                skips(where, "unreadable video or subtitles (left out with subtitles)", str(e))
                continue
            text = "No subtitles available" if shown is None else "\n".join(c[2] for c in shown)
            subbed.append({**item, "prompt": SUBS_PROMPT.format(subtitles=text, question=row["question"], options="\n".join(options))})
    write_manifest(os.path.join(args.out, "videomme_subs.jsonl"), subbed)
    skips.summary("videomme", write_manifest(os.path.join(args.out, "videomme.jsonl"), plain))


if __name__ == "__main__":
    main()
