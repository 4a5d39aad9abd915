"""
FineVideo (Farré et al., 2024; HuggingFaceFV/finevideo): 43,751 CC-BY YouTube videos (3,425 h) with Gemini-written
descriptions, scenes, activities and question-answer pairs; with LLaVA-Video-178K, the source of the audio-visual SFT
set (paper 4.2: about 13k videos "with rich audio information"). Licence: each video CC BY (from YouTube-Commons,
channels credited in the metadata) under the dataset's terms of use (gated: accept them on the dataset page). Layout
followed: the dataset card: Parquet shards (data/train-*.parquet) with the columns mp4 (the video's bytes) and json
(the metadata: content_metadata.description, content_metadata.scenes[].activities[].description,
content_metadata.qAndA[].question / .answer, ...). Parquet is read with pyarrow (requirements-data.txt).

$ hf auth login && hf download HuggingFaceFV/finevideo --repo-type=dataset --local-dir=downloads/finevideo   # ~600 GB
$ pip install -r requirements-data.txt
$ python data/finevideo/prepare.py --root=downloads/finevideo --min_audio=0.5
(hf is huggingface_hub's command line, installed by requirements-dev.txt)

Writes each video kept to <root>/videos/<shard>_<row>.mp4 and manifests/finevideo_{train,val}.jsonl (a hashed 1 % of
the videos for validation): per video a caption item, the description then each scene's activities in order (FineVideo's
own words; the speech is not written out), and a qa item per question-answer pair:
{"id": "train-00000-of-01357_0003", "video": "../downloads/finevideo/videos/train-00000-of-01357_0003.mp4",
 "task": "caption", "prompt": "Give a detailed account of everything in the video, ...", "response": "..."}
{"id": "train-00000-of-01357_0003_qa0", "video": "...", "task": "qa", "prompt": "QUESTION", "response": "ANSWER"}
--min_audio keeps the videos whose audio is heard in at least that fraction of their seconds (data.audible_fraction;
0 keeps all). Their atomic events for MrDPO come from eval.py --task=events.
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # data.py
from data import Skips, bad_layout, held_out, lacks_audio, write_manifest  # noqa: E402

try:
    import pyarrow.parquet as pq
except ImportError:
    raise SystemExit("data/finevideo/prepare.py reads Parquet with pyarrow: pip install -r requirements-data.txt")

CAPTION_PROMPT = ("Give a detailed account of everything in the video, capturing all the specifics. While doing so, also "
                  "include as much information from the audio as possible, ensuring that the descriptions of audio and "
                  "video are well-synchronized.")  # the released demo prompt (scripts/demo_data.yaml)


def caption(meta):
    """The description, then every scene's activities in time order: one chronological, detailed caption."""
    return " ".join(" ".join(s.split()) for s in [meta["description"]] + [a["description"] for scene in meta["scenes"]
                                                                        for a in scene.get("activities") or []])


def main(argv=None):
    parser = argparse.ArgumentParser(description="FineVideo -> audio-visual SFT manifests (captions and QA)")
    parser.add_argument("--root", required=True, help="the hf download of HuggingFaceFV/finevideo")
    parser.add_argument("--out", default="manifests", help="folder of the manifests written")
    parser.add_argument("--videos", default="", help="where the videos are written (default: <root>/videos)")
    parser.add_argument("--min_audio", type=float, default=0.5, help="least fraction of seconds with audio heard")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="videos held out for validation")
    args = parser.parse_args(argv)
    tables = sorted(glob.glob(os.path.join(args.root, "**", "*.parquet"), recursive=True))
    if not tables:
        bad_layout(f"{args.root}: expected FineVideo's Parquet shards (data/train-*.parquet, columns mp4 and json)")
    videos = args.videos or os.path.join(args.root, "videos")
    os.makedirs(videos, exist_ok=True)
    skips, splits = Skips(), {"train": [], "val": []}
    for table in tables:
        header = pq.read_schema(table).names
        if "mp4" not in header or "json" not in header:
            bad_layout(f"{table}: expected the columns mp4 and json; it has {', '.join(header)}")
        shard, n = os.path.basename(table).removesuffix(".parquet"), 0
        for batch in pq.ParquetFile(table).iter_batches(batch_size=8, columns=["mp4", "json"]):
            for row in batch.to_pylist():
                name, where, n = f"{shard}_{n:04d}", f"{table}: row {n}", n + 1
                try:
                    meta = row["json"]["content_metadata"]
                    text, pairs = caption(meta), [(q["question"], q["answer"]) for q in meta.get("qAndA") or []]
                    if not row["mp4"] or not text or not all(isinstance(x, str) for p in pairs for x in p):
                        raise TypeError
                except (KeyError, TypeError, AttributeError):
                    skips(where, "malformed row", "mp4 bytes, json.content_metadata with description and scenes expected")
                    continue
                video = os.path.join(videos, f"{name}.mp4")
                if not os.path.exists(video) or os.path.getsize(video) != len(row["mp4"]):  # kept as is: the feature cache keys on mtime
                    with open(video + ".tmp", "wb") as f:
                        f.write(row["mp4"])
                    os.replace(video + ".tmp", video)
                if rejected := lacks_audio(video, args.min_audio):
                    skips(where, *rejected)
                    os.remove(video)
                    continue
                items = splits["val" if held_out(name, args.val_fraction) else "train"]
                items.append({"id": name, "video": video, "task": "caption", "prompt": CAPTION_PROMPT, "response": text})
                items += [{"id": f"{name}_qa{k}", "video": video, "task": "qa", "prompt": q.strip(), "response": a.strip()}
                          for k, (q, a) in enumerate(pairs)]
    written = sum(write_manifest(os.path.join(args.out, f"finevideo_{s}.jsonl"), its) for s, its in splits.items())
    skips.summary("finevideo", written)


if __name__ == "__main__":
    main()
