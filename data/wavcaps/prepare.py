"""
WavCaps (Mei et al., 2023): about 400k sound clips from FreeSound, BBC Sound Effects, SoundBible and the AudioSet
strongly-labelled subset, with captions ChatGPT wrote from their descriptions; audio captioning data the authors
added to the audio alignment of video-SALMONN 2+ (their issue #9). Licence: the card says CC BY 4.0, the authors'
README allows academic use only, and each clip keeps its source's licence (FreeSound, BBC, SoundBible). Layout
followed: the Hugging Face release cvssp/WavCaps, json_files/<source>/<x>_final.json, each
{"num_captions_per_audio": 1, "data": [{"id", "caption", "duration", "audio": "wav_path", ...}]}, and the audio in
split zips Zip_files/<source>/<source>.zip, .z01, ...; a clip's file is named by its id (AudioSet ids end in .wav,
the files are .flac). The blacklist json_files/blacklist/blacklist_exclude_test_ac.json (AudioSet and FreeSound clips
also in the AudioCaps and Clotho test sets) is applied when present.

$ hf download cvssp/WavCaps --repo-type=dataset --local-dir=downloads/wavcaps
$ cd downloads/wavcaps && for s in AudioSet_SL BBC_Sound_Effects FreeSound SoundBible; do
      zip -s- Zip_files/$s/$s.zip -O $s-joined.zip && unzip -q $s-joined.zip -d $s && rm $s-joined.zip; done; cd -
$ python data/wavcaps/prepare.py --root=downloads/wavcaps
(hf is huggingface_hub's command line, installed by requirements-dev.txt)

Each source's audio must be extracted under --root/<source>/ (any depth below it). Writes manifests/wavcaps_train.jsonl:
{"id": "SoundBible/2219", "audio": "../downloads/wavcaps/SoundBible/.../2219.flac", "task": "audio_caption",
 "prompt": "Please describe the audio.", "response": "An airplane is landing."}
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # data.py
from data import Skips, bad_layout, write_manifest  # noqa: E402

PROMPT = "Please describe the audio."  # the authors' alignment prompt (their issue #9)
SOURCES = {"AudioSet_SL": "as_final.json", "BBC_Sound_Effects": "bbc_final.json", "FreeSound": "fsd_final.json",
           "SoundBible": "sb_final.json"}
BLACKLIST = {"AudioSet_SL": "AudioSet", "FreeSound": "FreeSound"}  # the blacklist's key of each source it lists
EXTENSIONS = (".flac", ".wav")


def audio_files(folder):
    """{file name without extension: path} of the audio under a folder, at any depth."""
    return {os.path.splitext(f)[0]: os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(EXTENSIONS)}


def main(argv=None):
    parser = argparse.ArgumentParser(description="WavCaps -> audio captioning manifest for audio alignment")
    parser.add_argument("--root", required=True, help="the hf download of cvssp/WavCaps, each source's audio extracted into <source>/")
    parser.add_argument("--out", default="manifests", help="folder of the manifests written")
    args = parser.parse_args(argv)
    tables = {s: p for s, f in SOURCES.items() if os.path.exists(p := os.path.join(args.root, "json_files", s, f))}
    if not tables:
        bad_layout(f"{args.root}: expected json_files/<source>/<x>_final.json of cvssp/WavCaps ("
                   + ", ".join(f"{s}/{f}" for s, f in SOURCES.items()) + ") with the audio extracted into <source>/")
    blacklist_file = os.path.join(args.root, "json_files", "blacklist", "blacklist_exclude_test_ac.json")
    blacklist = json.load(open(blacklist_file)) if os.path.exists(blacklist_file) else {}
    skips, items = Skips(), []
    for source, table in tables.items():
        files, excluded = audio_files(os.path.join(args.root, source)), set(blacklist.get(BLACKLIST.get(source), ()))
        try:
            rows = json.load(open(table, encoding="utf-8"))["data"]
        except (ValueError, KeyError, TypeError) as e:
            bad_layout(f"{table}: expected a JSON object with a 'data' list ({e})")
        for n, row in enumerate(rows):
            where = f"{table}: data[{n}]"
            if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("caption"), str):
                skips(where, "malformed row", "an id and a caption string expected")
            elif row["id"] in excluded:
                skips(where, "in the AudioCaps/Clotho test sets", row["id"])
            elif (audio := files.get(row["id"].removesuffix(".wav"))) is None:
                skips(where, "missing audio", f"{source}/**/{row['id'].removesuffix('.wav')}.flac")
            else:
                items.append({"id": f"{source}/{row['id']}", "audio": audio, "task": "audio_caption", "prompt": PROMPT,
                              "response": row["caption"].strip()})
    skips.summary("wavcaps", write_manifest(os.path.join(args.out, "wavcaps_train.jsonl"), items))


if __name__ == "__main__":
    main()
