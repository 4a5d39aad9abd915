"""
Common Voice (Ardila et al., LREC 2020; Mozilla): sentences read aloud by volunteers, the second speech recognition
source the authors added to the audio alignment of video-SALMONN 2+ (their issue #9). Licence: CC0 1.0. Layout
followed: a release archive cv-corpus-<version>-<locale>.tar.gz from https://commonvoice.mozilla.org/datasets (now
served through the Mozilla Data Collective, which asks for an account and an acceptance of its terms, so there is no
anonymous download command), which extracts to cv-corpus-<version>/<locale>/ holding clips/*.mp3 and the
tab-separated train.tsv, dev.tsv and test.tsv (columns client_id, path, sentence, up_votes, down_votes, age, gender,
accents, locale, segment, and in recent releases sentence_id, sentence_domain, variant: only path and sentence are read).

$ tar xzf cv-corpus-<version>-en.tar.gz -C downloads/
$ python data/commonvoice/prepare.py --root=downloads/cv-corpus-<version>/en

Writes manifests/commonvoice_{train,dev,test}.jsonl, one item a clip, the sentence as written (cased, punctuated):
{"id": "common_voice_en_17779714", "audio": "../downloads/cv-corpus-<version>/en/clips/common_voice_en_17779714.mp3",
 "task": "asr", "prompt": "Please transcribe the speech.", "response": "Two-wave sources are perfectly coherent ..."}
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # data.py
from data import Skips, bad_layout, table_rows, write_manifest  # noqa: E402

PROMPT = "Please transcribe the speech."  # the authors' alignment prompt (their issue #9)
COLUMNS = ("path", "sentence")
KNOWN = ("client_id", "sentence_id", "sentence_domain", "up_votes", "down_votes", "age", "gender", "accent", "accents",
         "variant", "locale", "segment")  # the releases' other columns, not read
SPLITS = ("train", "dev", "test")  # validated.tsv holds these and more; other.tsv and invalidated.tsv are not validated


def main(argv=None):
    parser = argparse.ArgumentParser(description="Common Voice -> ASR manifests for audio alignment")
    parser.add_argument("--root", required=True, help="a release's locale folder, cv-corpus-<version>/<locale>")
    parser.add_argument("--out", default="manifests", help="folder of the manifests written")
    args = parser.parse_args(argv)
    tables = {s: p for s in SPLITS if os.path.exists(p := os.path.join(args.root, f"{s}.tsv"))}
    if not tables or not os.path.isdir(os.path.join(args.root, "clips")):
        bad_layout(f"{args.root}: expected a Common Voice locale folder (cv-corpus-<version>/<locale>) with clips/ and "
                   "train.tsv, dev.tsv, test.tsv")
    skips, written = Skips(), 0
    for split, table in tables.items():
        items = []
        for n, row in table_rows(table, COLUMNS, skips, KNOWN):
            name, sentence = row["path"].strip(), " ".join(row["sentence"].split())
            if not name or not sentence:
                skips(f"{table}:{n}", "malformed row", "empty path or sentence")
            elif not os.path.exists(audio := os.path.join(args.root, "clips", name)):
                skips(f"{table}:{n}", "missing audio", audio)
            else:
                items.append({"id": os.path.splitext(name)[0], "audio": audio, "task": "asr", "prompt": PROMPT,
                              "response": sentence})
        written += write_manifest(os.path.join(args.out, f"commonvoice_{split}.jsonl"), items)
    skips.summary("commonvoice", written)


if __name__ == "__main__":
    main()
