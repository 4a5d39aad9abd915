"""The toy audio-visual world (data/toyav/prepare.py --small): determinism, manifests, captions and their atomic
events, questions, the media the captions describe, audio-only items and the tokenizer."""
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from data import encode_prompt, load_audio, load_video, read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "data", "toyav", "prepare.py")
_spec = importlib.util.spec_from_file_location("toyav_prepare", SCRIPT)  # data/ is not a package: data.py is
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    """The small set written twice with the default seed, into two directories."""
    dirs = [tmp_path_factory.mktemp(name) for name in ("a", "b")]
    for d in dirs:
        subprocess.run([sys.executable, SCRIPT, "--small", "--out", str(d)], cwd=ROOT, check=True, capture_output=True)
    return dirs


@pytest.fixture(scope="module")
def out(twice):
    return twice[0]


def items(out, name):
    with open(out / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


def captions(out):
    return [it for split in toy.SPLITS for it in items(out, split) if it["task"] == "caption"]


def test_same_seed_same_data(twice):
    a, b = twice
    files = sorted(os.path.relpath(p, a) for p in glob.glob(f"{a}/*.json*") + glob.glob(f"{a}/audio/*.wav")
                   if not p.endswith("meta.json"))  # meta.json holds the run's own timing
    assert len(files) == 22 + sum(toy.SMALL_AUDIO_ITEMS.values())  # 21 manifests, the tokenizer, the wavs
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for it in captions(a) + [it for s in toy.SPLITS for it in items(a, f"image_{s}")]:  # mp4 bytes may carry muxer metadata: compare what decodes
        ma, mb = (load_video(d / it["video"], image_size=32, n_mels=80, segment_seconds=4) for d in twice)
        assert torch.equal(ma.frames, mb.frames) and torch.equal(ma.mel, mb.mel)


def test_text_items_say_again_every_caption_and_audio_response_and_read_questions(out):
    for split in toy.SPLITS:
        av = items(out, split)
        caps = [it for it in av if it["task"] == "caption"]
        text, copy = items(out, f"text_{split}"), items(out, f"copy_{split}")
        assert all(it["task"] == "text" for it in text + copy)
        assert len(read_manifest(out / f"text_{split}.jsonl")) == len(text)
        assert len(read_manifest(out / f"copy_{split}.jsonl")) == len(copy)
        # text: each caption written out, a blank line, the caption prompt; then one of each clip's questions asked of
        # its caption, answered as the clip's question
        said, read = text[:len(caps)], text[len(caps):]
        assert [it["response"] for it in said] == [it["response"] for it in caps]
        assert all(it["prompt"] == f"{it['response']}\n\n{toy.CAPTION_PROMPT}" for it in said)
        assert len(read) == len(caps)
        for cap, it in zip(caps, read):
            qa = next(q for q in av if q["task"] == "qa" and q["video"] == cap["video"] and q["id"] + "_text" == it["id"])
            assert it["prompt"] == f"{cap['response']}\n\n{qa['prompt']}" and it["response"] == qa["response"]
        # copy: each audio item's response said again after its prompt, then 1-6 random toy words among runs of
        # blanks to transcribe without them
        align = items(out, f"align_{split}")
        again, words = copy[:len(align)], copy[len(align):]
        assert [it["prompt"] for it in again] == [f"{a['response']}\n\n{a['prompt']}" for a in align]
        assert [it["response"] for it in again] == [a["response"] for a in align]
        assert len(words) == toy.SMALL_COPIES[split]
        for it in words:
            spaced, instruction = it["prompt"].split("\n\n")
            assert instruction == toy.ASR_PROMPT and spaced.split() == it["response"].split()
            assert it["response"] == " ".join(spaced.split())  # one space between words, none around
            assert 1 <= len(it["response"].split()) <= 6 and all(w in toy.WORDS for w in it["response"].split())


def test_manifests_parse_and_reference_files(out):
    fields = {"caption": {"events"}, "qa": {"answer", "question", "options"}, "asr": set(), "audio_caption": set(),
              "image": set()}
    folder = {"video": "clips/", "audio": "audio/", "image": "images/"}
    for split in toy.SPLITS:
        for name in (split, f"base_{split}", f"align_{split}", f"image_{split}"):
            raw = items(out, name)
            assert raw and len(read_manifest(out / f"{name}.jsonl")) == len(raw)  # no line skipped as malformed
            for it in raw:
                media = it.get("video") or it["audio"]
                kind = "image" if it["task"] == "image" else "video" if "video" in it else "audio"
                assert media.startswith(folder[kind]) and (out / media).is_file()
                assert {"id", "task", "prompt", "response"} | fields[it["task"]] <= set(it)
            assert len({it["id"] for it in raw}) == len(raw)
    for split in toy.SPLITS:  # the visual-only items: each caption clip, with its visual events only, and a question
        full = [it for it in items(out, split) if it["task"] == "caption"]  # about what it shows
        base = items(out, f"base_{split}")
        assert [it["task"] for it in base] == ["caption", "qa"] * len(full)
        assert [it["video"] for it in full] == [it["video"] for it in base[0::2]] == [it["video"] for it in base[1::2]]
        for f, b, q in zip(full, base[0::2], base[1::2]):
            assert b["prompt"] == toy.VISUAL_PROMPT and f["prompt"] == toy.CAPTION_PROMPT
            assert b["events"] == [e for e in f["events"] if e["type"] == "visual"]
            assert b["response"] == " ".join(e["text"] for e in b["events"])
            assert toy.parse_answer(q["response"], q["options"]) == q["answer"] and len(set(q["options"])) == 4
            right = truths(q["question"], [e["key"] for e in b["events"]])  # answered from the visual events alone
            assert [o in right for o in q["options"]] == [letter == q["answer"] for letter in "ABCD"], q


def test_captions_round_trip_through_parse_caption(out):
    for split in toy.SPLITS:
        for it in items(out, split) + items(out, f"base_{split}"):
            if it["task"] == "caption":
                keys = [e["key"] for e in it["events"]]
                assert toy.parse_caption(it["response"]) == keys
                assert it["response"] == " ".join(toy.event_sentence(k) for k in keys)
                assert [e["text"] for e in it["events"]] == [toy.event_sentence(k) for k in keys]
                assert [e["start"] for e in it["events"]] == sorted(e["start"] for e in it["events"])
        for it in items(out, f"align_{split}"):
            if it["task"] == "audio_caption":  # "A low tone plays. Then a falling chirp sounds."
                assert all(toy.event_type(k) == "sound" for k in toy.parse_caption(it["response"]))


def test_parse_caption_marks_what_no_template_makes():
    text = 'A red circle appears.  A purple cow moos. Someone says "bako mizu". Someone says "hello". The blue'
    assert toy.parse_caption(text) == [["appear", "red", "circle"], ["unknown", "A purple cow moos."],
                                       ["say", "bako mizu"], ["unknown", 'Someone says "hello".'],
                                       ["unknown", "The blue"]]
    assert toy.parse_caption("") == []
    for key in toy.all_keys() + [["say", "tena"], ["say", "bako mizu zeta"]]:
        assert toy.parse_caption(toy.event_sentence(key)) == [key]


def truths(question, keys):
    """Every option that would be a right answer to a question about a clip with these events."""
    shown = [k for k in keys if k[0] == "appear"]
    if question == "How many shapes appeared?":
        return {str(len(shown))}
    if question == "Which of these shapes appeared?":
        return {f"a {k[1]} {k[2]}" for k in shown}
    if question.startswith("What colour was the "):
        colours = {k[1] for k in shown if k[2] == question[len("What colour was the "):-1]}
        assert len(colours) == 1, question  # "the circle" names one colour
        return colours
    if question == "Which word was spoken?":
        return {w for k in keys if k[0] == "say" for w in k[1].split()}
    if question == "Which digit appeared on screen?":
        return {k[1] for k in keys if k[0] == "digit"}
    assert question == "What sound was heard first?"
    return {toy.sound_name(next(k for k in keys if toy.event_type(k) != "visual"))}


def test_questions_have_one_right_answer_from_the_events(out):
    for split in toy.SPLITS:
        raw = items(out, split)
        keys = {it["video"]: [e["key"] for e in it["events"]] for it in raw if it["task"] == "caption"}
        questions = [it for it in raw if it["task"] == "qa"]
        assert len(questions) >= 2 * len(keys)
        for it in questions:
            assert it["answer"] in "ABCD" and len(set(it["options"])) == 4
            assert it["response"] == f"The answer is {it['options']['ABCD'.index(it['answer'])]}."
            listed = "\n".join(f"{letter}. {o}" for letter, o in zip("ABCD", it["options"]))
            assert it["prompt"] == toy.QA_PROMPT.format(question=it["question"], options=listed)
            right = truths(it["question"], keys[it["video"]])
            assert [o in right for o in it["options"]] == [letter == it["answer"] for letter in "ABCD"], it


def test_parse_answer_names_the_option_of_an_answer_sentence():
    options = ["a low tone", "speech", "a rising chirp", "a burst of noise"]
    assert toy.parse_answer("The answer is speech.", options) == "B"
    assert toy.parse_answer(" The answer is a burst of noise.\n", options) == "D"
    for other in ("The answer is a low.", "speech", "B", "The answer is speech. The answer is a low tone.", ""):
        assert toy.parse_answer(other, options) is None


def test_mute_clips_long_clips_and_event_timing(out):
    mute, long = 0, 0
    for it in captions(out):
        m = load_video(out / it["video"], image_size=32, n_mels=80, segment_seconds=4)
        types = {e["type"] for e in it["events"]}
        assert m.has_audio == (load_audio(out / it["video"]) is not None)
        if not m.has_audio:
            mute += 1
            assert types == {"visual"}
        long += m.duration > 8
        assert toy.MIN_SECONDS <= m.duration <= toy.MAX_SECONDS and m.duration == int(m.duration)
        assert m.mel.shape == (int(np.ceil(m.duration / 4)), 80, 400)
        seen = [e["start"] for e in it["events"] if e["type"] == "visual"]
        heard = [e["start"] for e in it["events"] if e["type"] != "visual"]
        assert all(b - a >= toy.HOLD for a, b in zip(seen, seen[1:])) and seen[-1] + toy.HOLD <= m.duration
        assert all(b - a >= toy.SLOT for a, b in zip(heard, heard[1:]))  # sounds never overlap
        assert not heard or heard[-1] + toy.SLOT <= m.duration
    assert mute >= len(toy.SPLITS) and long >= 1


def near(frame, rgb):  # (S, S) mask of pixels within 0.25 of an RGB colour on [0, 1], frame (3, S, S) in [-1, 1]
    target = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255
    return ((frame + 1) / 2 - target).abs().amax(0) < 0.25


def test_frames_show_the_visual_events(out):
    checked = set()
    for it in captions(out):
        m = load_video(out / it["video"], image_size=32, n_mels=80, segment_seconds=4)
        assert m.times == list(range(len(m.times)))  # one frame a second: frame i is second i
        frame = lambda t: m.frames[t]
        lower = lambda t: m.frames[t][:, 16:]  # shapes live in the lower half, the digit in the upper
        bg = None
        for e in it["events"]:
            t, (kind, *slots) = e["start"], e["key"]
            if kind in ("start", "background"):
                bg = slots[0]
                assert near(frame(t), toy.BACKGROUNDS[bg])[0, 0]
            elif kind == "appear":
                assert near(lower(t), toy.COLOURS[slots[0]]).any()
            elif kind == "disappear":
                assert not near(lower(t), toy.COLOURS[slots[0]]).any()
            elif kind == "move":  # it slides during the second after the event
                x = [near(lower(s), toy.COLOURS[slots[0]]).nonzero()[:, 1].float().mean() for s in (t, t + 1)]
                assert (x[1] > x[0] + 4) if slots[2] == "right" else (x[1] < x[0] - 4)
            elif kind == "digit":
                ink = (255, 255, 255) if bg == "black" else (0, 0, 0)
                assert near(frame(t)[:, :16], ink).sum() >= 8
            checked.add(kind)
    assert {"start", "background", "appear", "disappear", "move", "digit"} <= checked


def test_images_show_their_description(out):
    sides = {"on the left": 0, "in the middle": 1, "on the right": 2}
    seen = set()
    for split in toy.SPLITS:
        for it in items(out, f"image_{split}"):
            assert it["prompt"] == toy.IMAGE_PROMPT
            m = load_video(out / it["video"], image_size=32, n_mels=80, segment_seconds=4)
            assert len(m.times) == 1 and not m.has_audio
            frame = m.frames[0]  # (3, 32, 32)
            said = re.fullmatch(r"The background is (\w+)\.(?: A (\w+) (\w+) is (on the left|in the middle|on the right)\.)?"
                                r"(?: The digit (\d) is on screen\.)?", it["response"])
            assert said, it["response"]
            bg, colour, kind, side, digit = said.groups()
            assert near(frame, toy.BACKGROUNDS[bg])[0, 0]
            ink = near(frame[:, :16], (255, 255, 255) if bg == "black" else (0, 0, 0)).sum()
            assert ink >= 8 if digit else ink == 0
            lower = near(frame[:, 16:], toy.COLOURS[colour]) if colour else None
            if colour:  # the shape's colour in the lower half, centred in its third of the frame
                x = lower.nonzero()[:, 1].float().mean().item()
                assert kind in toy.SHAPES and int(x * 3 / 32) == sides[side], (it["response"], x)
            seen |= {bg, colour is not None, digit is not None}
    assert {True} <= seen  # some image shows a shape or a digit


def peak_hz(x):
    return np.argmax(np.abs(np.fft.rfft(x * np.hanning(len(x))))) * 16000 / len(x)


def test_soundtrack_has_the_sound_events(out):
    checked = set()
    for it in captions(out):
        audio = load_audio(out / it["video"])
        if audio is None:
            continue
        quiet = np.ones(len(audio), bool)
        for e in it["events"]:
            if e["type"] == "visual":
                continue
            (kind, *slots), a = e["key"], audio[e["start"] * 16000:(e["start"] + toy.SLOT) * 16000]
            quiet[max(0, e["start"] * 16000 - 800):(e["start"] + toy.SLOT) * 16000] = False  # AAC pre-echoes onsets
            assert np.abs(a).max() > 0.1
            if kind == "tone":
                assert abs(peak_hz(a[1600:16000]) - toy.TONES[slots[0]]) < 5
            if kind == "chirp":  # the pitch of its first half against its second
                lo, hi = peak_hz(a[:8000]), peak_hz(a[8000:16000])
                assert lo < hi if slots[0] == "rising" else lo > hi
            checked.add(kind)
        assert np.abs(audio[quiet]).max(initial=0) < 0.01  # silence between the events
    assert checked == {"tone", "chirp", "noise", "say"}


def test_audio_only_items(out):
    for split in toy.SPLITS:
        raw = items(out, f"align_{split}")
        assert [it["task"] for it in raw] == ["asr", "audio_caption"] * (len(raw) // 2)
        for it in raw:
            with wave.open(str(out / it["audio"])) as f:
                assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (16000, 1, 2)
                assert 1 <= f.getnframes() / 16000 <= 7.7  # three 1.5 s sounds after up to a second of silence each
            if it["task"] == "asr":
                assert it["prompt"] == toy.ASR_PROMPT and all(w in toy.WORDS for w in it["response"].split())
            else:
                assert it["prompt"] == toy.AUDIO_CAPTION_PROMPT and 1 <= len(toy.parse_caption(it["response"])) <= 3


def test_speech_says_one_word_to_a_slot(out):
    """Each toy word fills the start of its own 0.5 s slot (one aligner window) and is silent at its end, and an
    alignment item's utterance starts on a slot boundary."""
    slot = round(toy.WORD_SECONDS * toy.SR)
    x = toy.speech(["bako", "mizu", "fimo"], 150)
    assert len(x) == 3 * slot
    for k in range(3):
        word = np.abs(x[k * slot:(k + 1) * slot])
        assert word[:round(0.3 * toy.SR)].max() > 0.1 and word[-round(0.005 * toy.SR):].max() == 0
    for it in (it for it in items(out, "align_train") if it["task"] == "asr"):
        with wave.open(str(out / it["audio"])) as f:
            y = np.frombuffer(f.readframes(f.getnframes()), "<i2")
        first = np.flatnonzero(y)[0]  # an unvoiced plosive begins with 30 ms of closure
        assert first % slot < round(0.035 * toy.SR) and 1 <= first // slot <= 3


def band_power(x, lo, hi):
    spectrum, f = np.abs(np.fft.rfft(x)) ** 2, np.fft.rfftfreq(len(x), 1 / 16000)
    return spectrum[(f >= lo) & (f < hi)].mean()


def test_vowels_have_their_formants(out):
    for vowel, (f1, f2, f3) in toy.VOWELS.items():  # each vowel: strong near F1 and F2, weak between F2 and F3
        x = toy.voiced(150, (f1, f2, f3), 0.16)
        valley = band_power(x, (f2 + f3) / 2 - 100, (f2 + f3) / 2 + 100)
        assert band_power(x, f1 - 100, f1 + 100) > 3 * valley and band_power(x, f2 - 100, f2 + 100) > 3 * valley
    it = next(it for it in items(out, "align_train") if it["task"] == "asr")  # a real wav, lightly
    with wave.open(str(out / it["audio"])) as f:
        x = np.frombuffer(f.readframes(f.getnframes()), "<i2") / 32768
    spectrum, freqs = np.abs(np.fft.rfft(x)) ** 2, np.fft.rfftfreq(len(x), 1 / 16000)
    formants = [toy.VOWELS[v][:2] for word in it["response"].split() for v in word[1::2]]
    close = np.any([np.abs(freqs - f) < 100 for pair in formants for f in pair], axis=0)
    voice = (freqs >= 100) & (freqs < 4000)
    assert spectrum[voice].sum() > 0.9 * spectrum.sum()
    assert spectrum[close].mean() > 1.5 * spectrum[voice].mean()


def test_tokenizer(out):
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [tok.id_to_token(i) for i in range(3)] == toy.SPECIAL
    assert 500 <= tok.get_vocab_size() <= toy.VOCAB_SIZE
    texts = [it[k] for it in items(out, "train") + items(out, "align_train") for k in ("prompt", "response")]
    for text in texts + ['Someone says "zeta".\n\n', "Unseen words: café 42!"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    caption = captions(out)[0]["response"]
    assert len(tok.encode(caption).ids) < 0.3 * len(caption)  # the toy vocabulary is mostly whole words
    before, after = encode_prompt(tok, toy.CAPTION_PROMPT)
    assert tok.decode(before, skip_special_tokens=False) == \
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert tok.decode(after, skip_special_tokens=False) == \
        f"\n\n{toy.CAPTION_PROMPT}<|im_end|>\n<|im_start|>assistant\n"


def test_audio_only_items_time_their_events(out):
    """An alignment item's events (the keys its response says, in order) start where its wav stops being silent:
    what data.soundtrack_ids writes each window from; and on an aligner window, as a clip's start on its seconds."""
    for it in items(out, "align_train") + items(out, "align_test"):
        keys = [e["key"] for e in it["events"]]
        assert keys == ([["say", it["response"]]] if it["task"] == "asr" else toy.parse_caption(it["response"]))
        with wave.open(str(out / it["audio"])) as f:
            y = np.frombuffer(f.readframes(f.getnframes()), "<i2")
        for e in it["events"]:
            at, ms = round(e["start"] * toy.SR), toy.SR // 1000  # starts are given to the millisecond
            assert not y[max(0, at - round(0.1 * toy.SR)):max(0, at - ms)].any()  # silence before it
            assert y[at:at + round(0.035 * toy.SR)].any()  # sound within 35 ms (a plosive's closure is 30 ms)
            assert e["start"] / toy.WORD_SECONDS == int(e["start"] / toy.WORD_SECONDS)


def test_written_soundtracks_keep_what_is_seen_and_draw_what_is_heard(out):
    """written_{split}.jsonl: each clip with audio WRITTEN_SOUNDTRACKS times, its visual events as they are and its
    audio events drawn again as the clips' own are (so the LLM has to read them: the picture does not tell them)."""
    for split in toy.SPLITS:
        clips = [it for it in items(out, split) if it["task"] == "caption"]
        heard = [it for it in clips if any(e["type"] != "visual" for e in it["events"])]
        written = items(out, f"written_{split}")
        by_clip = {}
        for it in written:
            by_clip.setdefault(it["video"], []).append(it)
        assert {it["video"] for it in heard} <= set(by_clip) and len(written) == toy.WRITTEN_SOUNDTRACKS * len(by_clip)
        for it in clips:
            for w in by_clip.get(it["video"], []):
                seen = lambda x: [e for e in x["events"] if e["type"] == "visual"]
                assert seen(w) == seen(it) and w["prompt"] == toy.CAPTION_PROMPT
                assert w["response"] == " ".join(e["text"] for e in w["events"])
                assert [e["start"] for e in w["events"]] == sorted(e["start"] for e in w["events"])
        drawn = [tuple(tuple(e["key"]) for e in w["events"] if e["type"] != "visual") for w in written]
        assert len(set(drawn)) > len(drawn) // 2  # soundtracks differ from each other


def test_pretrain_encoders_runs_only_a_py_config(tmp_path):
    """--config names a file whose arch is read: anything but a .py file is refused, never run as Python."""
    from unittest import mock

    from config import UserError
    marker = tmp_path / "ran"
    yaml = tmp_path / "arch.yaml"
    yaml.write_text(f"import os\nos.mkdir({str(marker)!r})\n")  # valid Python: it would run if it were executed
    (tmp_path / "noarch.py").write_text("steps = 3\n")
    script = os.path.join(ROOT, "data", "toyav", "pretrain_encoders.py")
    with mock.patch.dict(sys.modules), mock.patch.object(sys, "path", [os.path.dirname(script), *sys.path]):
        spec = importlib.util.spec_from_file_location("pretrain_encoders", script)  # imports prepare.py beside it
        pretrain = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pretrain)
    out = ["--out", str(tmp_path / "enc.safetensors")]
    with pytest.raises(UserError, match="arch.yaml: not a config file"):
        pretrain.main(["--config", str(yaml), *out])
    assert not marker.exists()
    with pytest.raises(UserError, match="noarch.py: sets no arch"):
        pretrain.main(["--config", str(tmp_path / "noarch.py"), *out])
