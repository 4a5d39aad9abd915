"""
LibriSpeech (Panayotov et al., ICASSP 2015): 960 h of read English audiobooks with their transcripts, the speech
recognition half of the audio alignment stage (paper 4.2). Licence: CC BY 4.0. Source: https://www.openslr.org/12,
whose archives this follows: each extracts to LibriSpeech/<split>/<speaker>/<chapter>/ holding
<speaker>-<chapter>-<utterance>.flac files and one <speaker>-<chapter>.trans.txt of "<utterance id> TRANSCRIPT" lines.

$ mkdir -p downloads/librispeech && cd downloads/librispeech
$ for s in train-clean-100 train-clean-360 train-other-500 dev-clean test-clean; do
      wget https://www.openslr.org/resources/12/$s.tar.gz && tar xzf $s.tar.gz; done; cd -
$ python data/librispeech/prepare.py --root=downloads/librispeech

Writes manifests/librispeech_{train,dev,test}.jsonl, every split found (train-* is the 960 h), one item an utterance:
{"id": "1089-134686-0000", "audio": "../downloads/librispeech/LibriSpeech/test-clean/1089/134686/1089-134686-0000.flac",
 "task": "asr", "prompt": "Please transcribe the speech.", "response": "he hoped there would be stew for dinner ..."}
Transcripts are lower-cased, as Whisper-style references; the audio stays where it is.
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # data.py
from data import Skips, bad_layout, write_manifest  # noqa: E402

PROMPT = "Please transcribe the speech."  # the authors' alignment prompt (their issue #9)
GROUPS = ("train", "dev", "test")  # a split's name starts with its group: train-clean-100, dev-other, ...


def main(argv=None):
    parser = argparse.ArgumentParser(description="LibriSpeech -> ASR manifests for audio alignment")
    parser.add_argument("--root", required=True, help="the folder the archives were extracted into (it holds LibriSpeech/)")
    parser.add_argument("--out", default="manifests", help="folder of the manifests written")
    args = parser.parse_args(argv)
    base = os.path.join(args.root, "LibriSpeech")
    splits = sorted(s for s in os.listdir(base) if s.split("-")[0] in GROUPS) if os.path.isdir(base) else []
    if not splits:
        bad_layout(f"{args.root}: expected LibriSpeech/<split>/<speaker>/<chapter>/ with *.flac and "
                   "<speaker>-<chapter>.trans.txt, split train-*, dev-* or test-* (the openslr.org/12 archives)")
    skips, items = Skips(), {g: [] for g in GROUPS}
    for split in splits:
        for trans in sorted(glob.glob(os.path.join(base, split, "*", "*", "*.trans.txt"))):
            chapter = os.path.basename(trans)[:-len(".trans.txt")]
            with open(trans, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    utt, _, text = line.strip().partition(" ")
                    if not line.strip():
                        continue
                    if not text.strip() or not utt.startswith(chapter + "-"):
                        skips(f"{trans}:{n}", "malformed line", f"expected '{chapter}-<utterance> TRANSCRIPT'")
                        continue
                    audio = os.path.join(os.path.dirname(trans), utt + ".flac")
                    if not os.path.exists(audio):
                        skips(f"{trans}:{n}", "missing audio", audio)
                        continue
                    items[split.split("-")[0]].append({"id": utt, "audio": audio, "task": "asr", "prompt": PROMPT,
                                                       "response": " ".join(text.split()).lower()})
    written = sum(write_manifest(os.path.join(args.out, f"librispeech_{g}.jsonl"), its) for g, its in items.items() if its)
    skips.summary("librispeech", written)


if __name__ == "__main__":
    main()
