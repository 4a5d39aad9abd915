"""
The toy audio-visual world: the embedded default dataset, small enough to train the whole pipeline on a
laptop CPU in minutes. Each clip is a 64x64 video of coloured shapes, digits and background changes, with
a soundtrack of tones, chirps, noise bursts and a made-up spoken language; each comes with a detailed
ground-truth caption, its list of atomic events (paper section 3.3.1) and multiple-choice questions. Audio-only
speech and sound items feed the audio alignment stage, and a byte-level BPE tokenizer is fitted to all the text.

$ python data/toyav/prepare.py            # the full set into data/toyav/, 30-50 s on 2 cores
$ python data/toyav/prepare.py --small    # a few items per split, for tests
$ python data/toyav/prepare.py --out /tmp/toyav --seed 7

Everything comes from the seed: the same seed writes the same manifests, wavs, tokenizer and decoded frames.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import re
import time
import wave

import av
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SEED = 1337
SPLITS = ["train", "val", "test"]
CLIPS = {"train": 640, "val": 40, "test": 40}  # videos per split
AUDIO_ITEMS = {"train": 1000, "val": 50, "test": 50}  # audio-only items per split: half speech, half sounds
IMAGES = {"train": 1000, "val": 20, "test": 20}  # one-frame clips of a random state, described, for the visual base
COPIES = {"train": 2000, "val": 50, "test": 50}  # text items: random words to say again
SMALL_CLIPS = {"train": 8, "val": 2, "test": 2}  # --small: enough of everything for the tests
SMALL_AUDIO_ITEMS = {"train": 8, "val": 4, "test": 4}
SMALL_IMAGES = {"train": 4, "val": 2, "test": 2}
SMALL_COPIES = {"train": 4, "val": 2, "test": 2}
WORKERS = 2  # processes rendering and encoding clips
VOCAB_SIZE = 1000  # BPE's upper bound; the toy text runs out of merges a little below it

SIZE = 64  # frame side in pixels
FPS = 8  # video frame rate; the model samples 1 frame a second
SR = 16000  # audio sample rate, Whisper's
MIN_SECONDS, MAX_SECONDS = 4, 12  # clip length: the toy model hears 4 s an audio segment, long clips need several
HOLD = 2  # seconds every visual state stays on screen, so that 1-fps sampling sees it
SLOT = 2  # seconds an audio event has to itself: the sound, then silence before the next one
WRITTEN_SOUNDTRACKS = 3  # other soundtracks drawn for each clip with audio, for the toy LLM to read (written_*.jsonl)
MUTE_FRACTION = 0.1  # clips without an audio stream: their captions have no sound or speech events

# the world: what can be seen
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES = ["circle", "square", "triangle"]
PLACES = [14, 32, 50]  # x centres of the left, middle and right places a shape stands in
SHAPE_Y, SHAPE_R = 44, 9  # shapes live in the lower half of the frame, the digit in the upper half
DIGIT_X, DIGIT_Y, DIGIT_SCALE = 26, 4, 4  # a 3x5 bitmap digit scaled to 12x20 px, still 6x10 at 32 px
FONT = ["111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
        "111100111001111", "111100111101111", "111001010010010", "111101111101111", "111101111001111"]

# the world: what can be heard
TONES = {"low": 300, "middle": 800, "high": 2000}  # Hz of pure tones
CHIRPS = {"rising": (300, 3000), "falling": (3000, 300)}  # Hz at the start and end of a logarithmic sweep
TONE_SECONDS, NOISE_SECONDS, CHIRP_SECONDS = 1.5, 1.0, 1.5
WORDS = ["bako", "mizu", "tena", "sopi", "dume", "gafi", "poki", "nubo", "zeta", "kesu", "fimo", "dagu"]
VOWELS = {"a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010),  # formants F1-F3 in Hz,
          "o": (570, 840, 2410), "u": (300, 870, 2240)}  # Peterson and Barney's adult male averages
FORMANT_GAINS = (1.0, 0.6, 0.3)  # higher formants are weaker
FORMANT_WIDTH = 80  # Hz, the bandwidth of a formant resonance
PLOSIVES = {"p": 800, "b": 800, "k": 2000, "g": 2000, "t": 4000, "d": 4000}  # centre Hz of the release burst
FRICATIVES = {"f": 3000, "s": 6000, "z": 6000}  # centre Hz of the hiss
NASALS = {"m": 1000, "n": 1600}  # second resonance Hz of the hum through the nose
VOICED = set("bgdzmn")  # consonants with the vocal folds buzzing
VOWEL_SECONDS = 0.16
WORD_SECONDS = 0.5  # a word's slot, silence after it: the toy speaks one word to an audio token (0.5 s Q-Former
# windows from the second an utterance starts), so the aligner can hand the LLM one word a token to copy
SPEECH_FRACTION = 0.35  # of a clip's audio events; the rest are tones, chirps and noise
PITCH = (120, 200)  # Hz range of a speaker's voice

# the text
SYSTEM = "You are a helpful assistant."  # data.SYSTEM, the chat's system prompt: part of the tokenizer's text
CAPTION_PROMPT = "Describe the video in detail, including what you see and what you hear."
VISUAL_PROMPT = "Describe what you see in the video."
IMAGE_PROMPT = "Describe the image."
SIDES = ["on the left", "in the middle", "on the right"]  # PLACES in words
# Not Video-MME's letter prompt: answered with a letter, the toy LLM never ties the letter to its option (LoRA SFT: every
# answer "A"), and an option's word said alone, without the space before it in the captions, is a token the captions
# never taught; said in a sentence, the answer is the captions' own word (dev/LOG.md, session 10)
QA_PROMPT = ("Answer the following multiple-choice question about the video with the words of the correct option.\n"
             "{question}\n{options}")
ANSWER = "The answer is {}."
ASR_PROMPT = "Please transcribe the speech."
AUDIO_CAPTION_PROMPT = "Please describe the audio."
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as Qwen2's chat tokens
TEMPLATES = {  # an atomic event's key is [kind, *slots]; its caption sentence is the template filled with the slots
    "start": "The video begins on a {} background.",
    "background": "The background turns {}.",
    "appear": "A {} {} appears.",
    "move": "The {} {} moves to the {}.",
    "disappear": "The {} {} disappears.",
    "digit": "The digit {} appears on screen.",
    "tone": "A {} tone plays.",
    "noise": "A burst of noise is heard.",
    "chirp": "A {} chirp sounds.",
    "say": 'Someone says "{}".',
}
SOUND_KINDS = {"tone", "noise", "chirp"}  # the other kinds are visual, except "say": speech

# -----------------------------------------------------------------------------
# atomic events and their sentences: the caption language, and its exact inverse for the judge


def event_sentence(key):
    """The caption sentence of an atomic event: ["appear", "red", "circle"] -> "A red circle appears."."""
    return TEMPLATES[key[0]].format(*key[1:])


def event_type(key):
    return "speech" if key[0] == "say" else "sound" if key[0] in SOUND_KINDS else "visual"


def all_keys():
    """Every atomic event but speech, whose utterances are too many to list."""
    shapes = [[c, s] for c in COLOURS for s in SHAPES]
    return ([["start", b] for b in BACKGROUNDS] + [["background", b] for b in BACKGROUNDS]
            + [["appear", *s] for s in shapes] + [["move", *s, d] for s in shapes for d in ("left", "right")]
            + [["disappear", *s] for s in shapes] + [["digit", str(d)] for d in range(10)]
            + [["tone", t] for t in TONES] + [["noise"]] + [["chirp", c] for c in CHIRPS])


KEY_OF_SENTENCE = {event_sentence(k): k for k in all_keys()}
SAID = re.compile(r'Someone says "([a-z]+(?: [a-z]+)*)"\.')


def parse_caption(text):
    """The atomic event keys of a caption, in order: the inverse of event_sentence, sentence by sentence.
    A sentence that no template makes is ["unknown", sentence]: a judge counts it as a hallucination.
    "Then ..." (the audio descriptions' joint) reads as the sentence without it."""
    keys = []
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        if not sentence:
            continue
        bare = sentence[5].upper() + sentence[6:] if sentence.startswith("Then ") else sentence
        said = SAID.fullmatch(bare)
        if bare in KEY_OF_SENTENCE:
            keys.append(list(KEY_OF_SENTENCE[bare]))
        elif said and all(w in WORDS for w in said[1].split()):
            keys.append(["say", said[1]])
        else:
            keys.append(["unknown", sentence])
    return keys


def parse_answer(text, options):
    """The letter of the option an answer names ("The answer is red." among "blue", "red", ... -> "B"); None when
    the answer is not one of the options' sentences."""
    for letter, option in zip("ABCD", options):
        if text.strip() == ANSWER.format(option):
            return letter
    return None


def sound_name(key):  # how a question's options name a sound
    names = {"tone": f"a {key[-1]} tone", "chirp": f"a {key[-1]} chirp", "noise": "a burst of noise", "say": "speech"}
    return names[key[0]]


SOUND_KEYS = [k for k in all_keys() if event_type(k) == "sound"]
SOUND_NAMES = [sound_name(k) for k in SOUND_KEYS] + ["speech"]

# -----------------------------------------------------------------------------
# sounds, synthesised with numpy


def fade(x, seconds=0.01):  # raised-cosine ends: a sound that starts or stops abruptly clicks
    n = min(round(seconds * SR), len(x) // 2)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, n))
    x = x.copy()
    x[:n] *= ramp
    x[len(x) - n:] *= ramp[::-1]
    return x


def band_noise(rng, seconds, centre, width):
    """White noise filtered to a Gaussian band around centre Hz, peak 1: the hiss of a consonant."""
    x = rng.standard_normal(round(seconds * SR))
    f = np.fft.rfftfreq(len(x), 1 / SR)
    y = np.fft.irfft(np.fft.rfft(x) * np.exp(-0.5 * ((f - centre) / width) ** 2), len(x))
    return y / np.abs(y).max()


def voiced(f0, formants, seconds):
    """A voiced sound, peak 1: the harmonics of the pitch f0, each as loud as it is close to the formants, the
    vocal tract's resonances that make an a sound like an a. The pitch falls 10% over the sound, as in speech."""
    t = np.arange(round(seconds * SR)) / SR
    phase = 2 * np.pi * f0 * (t - 0.05 * t ** 2 / seconds)
    out = np.zeros_like(t)
    for k in range(1, int(4000 / f0) + 1):
        gain = sum(g / (1 + ((k * f0 - f) / FORMANT_WIDTH) ** 2) for f, g in zip(formants, FORMANT_GAINS))
        out += gain * np.sin(k * phase)
    return out / np.abs(out).max()


def consonant(c, f0):
    """A consonant: a burst, a hiss or a hum, the same every time it is said (its noise is seeded by the letter)."""
    noise = np.random.default_rng(ord(c))
    hum = lambda seconds: voiced(f0, (250, 1000, 2500), seconds)  # the buzz of a voiced consonant, mouth closed
    if c in NASALS:
        return 0.5 * voiced(f0, (250, NASALS[c], 2500), 0.07)
    if c in PLOSIVES:  # the mouth closes (silent, or a quiet buzz), then opens with a short burst
        closure = 0.1 * hum(0.03) if c in VOICED else np.zeros(round(0.03 * SR))
        burst = 0.5 * band_noise(noise, 0.02, PLOSIVES[c], 600) * np.linspace(1, 0.2, round(0.02 * SR))
        return np.concatenate([closure, burst])
    hiss = 0.25 * fade(band_noise(noise, 0.1, FRICATIVES[c], 800))
    return hiss + 0.2 * fade(hum(0.1)) if c in VOICED else hiss


def word_sound(w, f0):
    """One toy word, two consonant-vowel syllables (0.42-0.49 s), then silence to the end of its WORD_SECONDS slot."""
    pieces = []
    for c, v in (w[0:2], w[2:4]):
        pieces += [consonant(c, f0), fade(voiced(f0, VOWELS[v], VOWEL_SECONDS), 0.02)]
    out = np.concatenate(pieces)
    return np.pad(out, (0, round(WORD_SECONDS * SR) - len(out)))


def speech(words, f0):
    """An utterance of toy words, one a slot, peak 0.5."""
    out = np.concatenate([word_sound(w, f0) for w in words])
    return 0.5 * out / np.abs(out).max()


def sound(key, rng):
    """The waveform of an audio event, at most SLOT seconds (speech takes a speaker's pitch from rng)."""
    kind = key[0]
    if kind == "tone":
        return 0.3 * fade(np.sin(2 * np.pi * TONES[key[1]] * np.arange(round(TONE_SECONDS * SR)) / SR))
    if kind == "noise":
        return 0.15 * fade(np.clip(rng.standard_normal(round(NOISE_SECONDS * SR)), -3, 3))
    if kind == "chirp":  # logarithmic sweep: the frequency changes by the same ratio every second
        (f0, f1), t = CHIRPS[key[1]], np.arange(round(CHIRP_SECONDS * SR)) / SR
        k = np.log(f1 / f0) / CHIRP_SECONDS
        return 0.3 * fade(np.sin(2 * np.pi * f0 * np.expm1(k * t) / k))
    return speech(key[1].split(), rng.uniform(*PITCH))


def write_wav(path, audio):  # 16-bit mono PCM, with the standard library
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SR)
        f.writeframes((np.clip(audio, -1, 1) * 32767).round().astype("<i2").tobytes())


# -----------------------------------------------------------------------------
# a clip: plan its events, draw its frames, mix its soundtrack, ask about it


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def audio_key(rng):
    """A random sound, or an utterance of 1-3 different words."""
    if rng.random() < SPEECH_FRACTION:
        return ["say", " ".join(WORDS[i] for i in rng.choice(len(WORDS), int(rng.integers(1, 4)), replace=False))]
    return list(pick(rng, SOUND_KEYS))


def chronological(events):
    """[(start second, key)] in time order; stable, and at the same second sight first."""
    return sorted(events, key=lambda e: (e[0], event_type(e[1]) != "visual"))


def manifest_events(timed):
    """[(start second, key)] -> the manifest's events: {"text", "type", "key", "start"} each, in the same order."""
    return [{"text": event_sentence(k), "type": event_type(k), "key": k, "start": t} for t, k in timed]


def plan_soundtrack(rng, seconds):
    """A clip's audio events [(start second, key)]: 2 s slots with 0-2 s of silence between."""
    events, t = [], int(rng.integers(0, 2))
    while t + SLOT <= seconds:
        events.append((t, audio_key(rng)))
        t += SLOT + int(rng.integers(0, 3))
    return events


def plan_clip(rng, has_audio):
    """A clip's length in seconds, its atomic events [(start second, key)] in chronological order, and the place
    {second: index into PLACES} a shape appears in or moves to. Visual changes come every 2-3 s, the first one
    brings a shape; sounds have 2 s slots with 0-2 s of silence between."""
    seconds = int(rng.integers(MIN_SECONDS, MAX_SECONDS + 1))
    bg = pick(rng, list(BACKGROUNDS))
    events, places = [(0, ["start", bg])], {}
    shape, place, digit = None, None, None  # on screen: [colour, kind] at PLACES[place], and a digit
    t = HOLD
    while t + HOLD <= seconds:
        actions = ["background", "digit"] + (["move", "move", "disappear"] if shape else ["appear", "appear"])
        act = "appear" if len(events) == 1 else pick(rng, actions)
        if act == "appear":
            shape, place = [pick(rng, list(COLOURS)), pick(rng, SHAPES)], int(rng.integers(len(PLACES)))
            key, places[t] = ["appear", *shape], place
        elif act == "move":
            step = pick(rng, [s for s in (-1, 1) if 0 <= place + s < len(PLACES)])
            place += step
            key, places[t] = ["move", *shape, "right" if step > 0 else "left"], place
        elif act == "disappear":
            key, shape = ["disappear", *shape], None
        elif act == "background":
            bg = pick(rng, [b for b in BACKGROUNDS if b != bg])
            key = ["background", bg]
        else:
            digit = pick(rng, [str(d) for d in range(10) if str(d) != digit])
            key = ["digit", digit]
        events.append((t, key))
        t += HOLD + int(rng.integers(0, 2))
    if has_audio:
        events += plan_soundtrack(rng, seconds)
    return seconds, chronological(events), places


GRID_Y, GRID_X = np.mgrid[0:SIZE, 0:SIZE] + 0.5  # pixel centres


def shape_mask(kind, x):
    dx, dy = GRID_X - x, GRID_Y - SHAPE_Y
    if kind == "circle":
        return dx ** 2 + dy ** 2 <= SHAPE_R ** 2
    if kind == "square":  # a little inside the circle's box, so that both cover about the same area
        return (np.abs(dx) <= SHAPE_R - 1) & (np.abs(dy) <= SHAPE_R - 1)
    return (np.abs(dy) <= SHAPE_R) & (np.abs(dx) <= 0.6 * (dy + SHAPE_R))  # a triangle pointing up


def digit_mask(d):
    glyph = np.kron(np.array(list(FONT[int(d)]), int).reshape(5, 3), np.ones((DIGIT_SCALE, DIGIT_SCALE), int))
    mask = np.zeros((SIZE, SIZE), bool)
    mask[DIGIT_Y:DIGIT_Y + glyph.shape[0], DIGIT_X:DIGIT_X + glyph.shape[1]] = glyph > 0
    return mask


def render_frames(seconds, events, places):
    """The (seconds * FPS, SIZE, SIZE, 3) uint8 frames. A visual event shows from its second on; a move slides the
    shape to its new place during the following second, so the frame at the event's second still shows the old one."""
    changes = {t * FPS: (key, places.get(t)) for t, key in events if event_type(key) == "visual"}
    frames = np.empty((seconds * FPS, SIZE, SIZE, 3), np.uint8)
    bg = digit = shape = None
    x_from = x_to = moved_at = 0
    for f in range(len(frames)):
        if f in changes:
            key, place = changes[f]
            if key[0] in ("start", "background"):
                bg = key[1]
            elif key[0] == "digit":
                digit = key[1]
            elif key[0] == "disappear":
                shape = None
            else:  # appear, or move: slide from where the shape stands
                shape, x_from, moved_at = key[1:3], x_to if key[0] == "move" else PLACES[place], f
                x_to = PLACES[place]
        x = x_from + (x_to - x_from) * min(1.0, (f - moved_at) / FPS)
        frames[f] = draw(bg, digit, None if shape is None else (*shape, x))
    return frames


def random_state(rng):
    """What one frame of a clip may show: (background, digit or None, (colour, kind, place index) or None)."""
    bg = pick(rng, list(BACKGROUNDS))
    shape = None if rng.random() < 0.2 else (pick(rng, list(COLOURS)), pick(rng, SHAPES), int(rng.integers(len(PLACES))))
    return bg, None if rng.random() < 0.3 else str(rng.integers(10)), shape


def describe_state(bg, digit, shape):
    """A frame's description: "The background is gray. A blue circle is on the left. The digit 7 is on screen."."""
    text = f"The background is {bg}."
    text += f" A {shape[0]} {shape[1]} is {SIDES[shape[2]]}." if shape else ""
    return text + (f" The digit {digit} is on screen." if digit is not None else "")


def draw_state(bg, digit, shape):
    return draw(bg, digit, shape and (shape[0], shape[1], PLACES[shape[2]]))


def draw(bg, digit, shape):
    """One (SIZE, SIZE, 3) uint8 frame: the background, the digit (or None) and the shape (colour, kind, x centre)
    (or None)."""
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = BACKGROUNDS[bg]
    if digit is not None:
        img[digit_mask(digit)] = (255, 255, 255) if bg == "black" else (0, 0, 0)
    if shape is not None:
        img[shape_mask(shape[1], shape[2])] = COLOURS[shape[0]]
    return img


def mix(seconds, events, rng):
    """The soundtrack: each sound or utterance from its second on, silence elsewhere."""
    audio = np.zeros(seconds * SR)
    for t, key in events:
        if event_type(key) != "visual":
            s = sound(key, rng)
            audio[t * SR:t * SR + len(s)] += s
    return audio.astype(np.float32)


def yuv420p(img):
    """An RGB frame as the YUV 4:2:0 planes (Y, then U and V at half resolution) stacked into (1.5 * SIZE, SIZE):
    BT.601 limited range, what decoders assume for untagged video. Converted here rather than by swscale inside
    the encoder, whose output varied with what the process had converted before."""
    r, g, b = (img[..., i] / 255 for i in range(3))
    y = 16 + 219 * (0.299 * r + 0.587 * g + 0.114 * b)
    u = 128 + 224 * (-0.168736 * r - 0.331264 * g + 0.5 * b)
    v = 128 + 224 * (0.5 * r - 0.418688 * g - 0.081312 * b)
    half = lambda c: c.reshape(SIZE // 2, 2, SIZE // 2, 2).mean(axis=(1, 3)).reshape(SIZE // 4, SIZE)
    return np.concatenate([y, half(u), half(v)]).round().astype(np.uint8)


def write_mp4(path, frames, audio):
    """h264 yuv420p video at FPS, with a 16 kHz mono AAC track unless audio is None. The video is lossless (and
    smaller than at the default quality: flat colours): it decodes to exactly yuv420p(frame), whereas x264's lossy
    choices varied with what the process had encoded before, so the same seed gave other pixels."""
    with av.open(path, "w") as out:
        video = out.add_stream("libx264", rate=FPS, options={"qp": "0", "threads": "1"})  # the workers fill the cores
        video.width = video.height = SIZE
        video.pix_fmt = "yuv420p"
        track = None if audio is None else out.add_stream("aac", rate=SR, layout="mono")
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(yuv420p(img), format="yuv420p")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if track is not None:
            for k in range(0, len(audio), 1024):  # AAC's frame size
                frame = av.AudioFrame.from_ndarray(audio[None, k:k + 1024], format="fltp", layout="mono")
                frame.rate, frame.pts = SR, k
                out.mux(track.encode(frame))
            out.mux(track.encode(None))


def ask(rng, question, answer, others):
    """A multiple-choice question: the answer among 3 of the others, shuffled -> (question, options, letter)."""
    options = [answer] + [others[i] for i in rng.choice(len(others), 3, replace=False)]
    options = [options[i] for i in rng.permutation(4)]
    return question, options, "ABCD"[options.index(answer)]


def make_questions(rng, keys):
    """2-3 multiple-choice questions about a clip, each about something in it and with one right answer."""
    shapes = [f"a {k[1]} {k[2]}" for k in keys if k[0] == "appear"]
    colours = {s: sorted({k[1] for k in keys if k[0] == "appear" and k[2] == s}) for s in SHAPES}
    words = sorted({w for k in keys if k[0] == "say" for w in k[1].split()})
    digits = sorted({k[1] for k in keys if k[0] == "digit"})
    sounds = [k for k in keys if event_type(k) != "visual"]
    single = [s for s in SHAPES if len(colours[s]) == 1]  # "the circle" must be of one colour
    candidates = [("How many shapes appeared?", str(len(shapes)), [str(n) for n in range(1, 8) if n != len(shapes)])]
    if single:
        s = pick(rng, single)
        candidates.append((f"What colour was the {s}?", colours[s][0], [c for c in COLOURS if c != colours[s][0]]))
    else:
        candidates.append(("Which of these shapes appeared?", pick(rng, shapes),
                           [f"a {c} {s}" for c in COLOURS for s in SHAPES if f"a {c} {s}" not in shapes]))
    if words:
        candidates.append(("Which word was spoken?", pick(rng, words), [w for w in WORDS if w not in words]))
    if digits:
        candidates.append(("Which digit appeared on screen?", pick(rng, digits),
                           [str(d) for d in range(10) if str(d) not in digits]))
    if sounds:
        first = sound_name(sounds[0])
        candidates.append(("What sound was heard first?", first, [s for s in SOUND_NAMES if s != first]))
    candidates = [c for c in candidates if len(c[2]) >= 3]  # a clip that shows 8 digits leaves too few wrong ones
    chosen = sorted(rng.choice(len(candidates), min(len(candidates), int(rng.integers(2, 4))), replace=False))
    return [ask(rng, *candidates[i]) for i in chosen]


def qa_item(name, video, question, options, letter):
    listed = "\n".join(f"{l}. {o}" for l, o in zip("ABCD", options))
    return {"id": name, "video": video, "task": "qa", "prompt": QA_PROMPT.format(question=question, options=listed),
            "response": ANSWER.format(options["ABCD".index(letter)]), "answer": letter, "question": question,
            "options": options}


def make_clip(job):
    """Write one clip's mp4 -> (its caption and QA items, its visual-only caption and question, a text item that
    asks one of its questions of its caption)."""
    out, seed, split, i, has_audio = job
    rng = np.random.default_rng([seed, SPLITS.index(split), 0, i])
    seconds, events, places = plan_clip(rng, has_audio)
    name = f"{split}_{i:04d}"
    video = f"clips/{name}.mp4"
    audio = mix(seconds, events, rng) if has_audio else None
    write_mp4(os.path.join(out, video), render_frames(seconds, events, places), audio)
    entries = manifest_events(events)
    items = [{"id": name, "video": video, "task": "caption", "prompt": CAPTION_PROMPT,
              "response": " ".join(e["text"] for e in entries), "events": entries}]
    items += [qa_item(f"{name}_qa{j}", video, *q) for j, q in enumerate(make_questions(rng, [k for _, k in events]))]
    seen = [e for e in entries if e["type"] == "visual"]
    base = [{"id": name, "video": video, "task": "caption", "prompt": VISUAL_PROMPT,
             "response": " ".join(e["text"] for e in seen), "events": seen}]
    # a question about what is seen only (its own draws, so the rest of the world is as without it): a visual LLM
    # answers them, as LLaVA-OneVision, the 7B model's base, does
    rng = np.random.default_rng([seed, SPLITS.index(split), 3, i])
    base.append(qa_item(f"{name}_vqa", video, *pick(rng, make_questions(rng, [e["key"] for e in seen]))))
    read = read_item(items[0]["response"], pick(rng, items[1:]))
    rng = np.random.default_rng([seed, SPLITS.index(split), 5, i])
    sights, written = [(t, key) for t, key in events if event_type(key) == "visual"], []
    for k in range(WRITTEN_SOUNDTRACKS if has_audio else 0):
        drawn = manifest_events(chronological(sights + plan_soundtrack(rng, seconds)))
        written.append({"id": f"{name}_w{k}", "video": video, "task": "caption", "prompt": CAPTION_PROMPT,
                        "response": " ".join(e["text"] for e in drawn), "events": drawn})
    return items, base, read, written


def make_image(job):
    """Write a one-second clip of one random state -> its image item (one frame sampled, no audio stream): the
    image-description data a visual LLM learns to read frames from, as LLaVA-OneVision's single-image stages."""
    out, seed, split, i = job
    state = random_state(np.random.default_rng([seed, SPLITS.index(split), 4, i]))
    name = f"{split}_{i:04d}"
    write_mp4(os.path.join(out, "images", f"{name}.mp4"), np.repeat(draw_state(*state)[None], FPS, 0), None)
    return {"id": f"image_{name}", "video": f"images/{name}.mp4", "task": "image", "prompt": IMAGE_PROMPT,
            "response": describe_state(*state)}


# -----------------------------------------------------------------------------
# audio-only items for the alignment stage: speech to transcribe, sounds to describe


def make_audio_item(job):
    """Write one wav -> its item: even i, 1-4 words between pauses to transcribe; odd i, 1-3 sounds to describe."""
    out, seed, split, i = job
    rng = np.random.default_rng([seed, SPLITS.index(split), 1, i])
    silence = lambda lo, hi: np.zeros(round(rng.uniform(lo, hi) * SR))
    if i % 2 == 0:
        words = [WORDS[w] for w in rng.choice(len(WORDS), int(rng.integers(1, 5)), replace=False)]
        lead = np.zeros(round(int(rng.integers(1, 4)) * WORD_SECONDS * SR))  # an utterance starts on a slot, as in clips
        audio = np.concatenate([lead, speech(words, rng.uniform(*PITCH)), silence(0.3, 1.5)])
        task, prompt, response = "asr", ASR_PROMPT, " ".join(words)
        timed = [(len(lead) / SR, ["say", response])]
    else:
        keys, pieces, timed = [list(pick(rng, SOUND_KEYS)) for _ in range(int(rng.integers(1, 4)))], [], []
        for n, k in enumerate(keys):  # a sound starts on an aligner window, as in clips (whose events start on seconds)
            pieces.append(np.zeros(round(int(rng.integers(0 if n == 0 else 1, 3)) * WORD_SECONDS * SR)))
            timed.append((sum(map(len, pieces)) / SR, k))
            pieces.append(sound(k, rng))
        audio = np.concatenate(pieces + [np.zeros(round(0.2 * SR))])
        sentences = [event_sentence(k) for k in keys]
        task, prompt = "audio_caption", AUDIO_CAPTION_PROMPT
        response = " ".join(sentences[:1] + [f"Then {s[0].lower()}{s[1:]}" for s in sentences[1:]])
    name = f"{split}_{i:04d}"
    write_wav(os.path.join(out, "audio", f"{name}.wav"), audio)
    events = manifest_events([(round(t, 3), k) for t, k in timed])
    return {"id": name, "audio": f"audio/{name}.wav", "task": task, "prompt": prompt, "response": response,
            "events": events}


# -----------------------------------------------------------------------------
# the tokenizer, and the whole set


def train_tokenizer(texts, path):
    """A byte-level BPE over the toy text (given line by line, so that a newline stays a token of its own: a text-only
    prompt's blank line is then the two newline tokens around the media block), with Qwen2's chat special tokens
    at ids 0-2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(path)
    return tok


def write_jsonl(path, items):
    with open(path, "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)


def main():
    parser = argparse.ArgumentParser(description="Write the toy audio-visual dataset.")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output directory")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--small", action="store_true", help="a few items per split, for tests")
    parser.add_argument("--keep", action="store_true", help="do nothing if --out holds this seed's world already")
    args = parser.parse_args()
    with open(os.path.abspath(__file__), "rb") as f:
        generator = hashlib.sha256(f.read()).hexdigest()[:16]  # this file: a changed world is a changed file
    meta_path = os.path.join(args.out, "meta.json")
    if args.keep and os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        if (meta["seed"], meta["small"], meta.get("generator")) == (args.seed, args.small, generator):
            print(f"{args.out} holds the toy world of seed {args.seed} from this generator: kept")
            return
    if os.path.exists(meta_path):  # from here on the directory holds no whole world until meta.json is written again
        os.remove(meta_path)
    t0 = time.time()
    clips, audio_items, images, copies = ((SMALL_CLIPS, SMALL_AUDIO_ITEMS, SMALL_IMAGES, SMALL_COPIES) if args.small
                                          else (CLIPS, AUDIO_ITEMS, IMAGES, COPIES))
    for sub in ("clips", "audio", "images"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    clip_jobs, audio_jobs, image_jobs = [], [], []
    for s, split in enumerate(SPLITS):
        n = clips[split]
        order = np.random.default_rng([args.seed, s, 2]).permutation(n).tolist()
        mute = set(order[:max(1, round(MUTE_FRACTION * n))])  # at least one a split, even with --small
        clip_jobs += [(args.out, args.seed, split, i, i not in mute) for i in range(n)]
        audio_jobs += [(args.out, args.seed, split, i) for i in range(audio_items[split])]
        image_jobs += [(args.out, args.seed, split, i) for i in range(images[split])]
    with multiprocessing.Pool(WORKERS) as pool:
        clip_results = pool.map(make_clip, clip_jobs, chunksize=4)
        audio_results = pool.map(make_audio_item, audio_jobs, chunksize=16)
        image_results = pool.map(make_image, image_jobs, chunksize=16)
    texts = ["system", "user", "assistant", SYSTEM] + [event_sentence(k) for k in all_keys()] + WORDS + SOUND_NAMES
    for split in SPLITS:
        av_items = [it for job, (items, _, _, _) in zip(clip_jobs, clip_results) if job[2] == split for it in items]
        base_items = [it for job, (_, base, _, _) in zip(clip_jobs, clip_results) if job[2] == split for it in base]
        image_items = [it for job, it in zip(image_jobs, image_results) if job[2] == split]
        align_items = [it for job, it in zip(audio_jobs, audio_results) if job[2] == split]
        text_items = [repeat_item(it) for it in av_items if it["task"] == "caption"]
        copy_items = [repeat_item(it) for it in align_items] + [copy_item(split, args.seed, i) for i in range(copies[split])]
        text_items += [read for job, (_, _, read, _) in zip(clip_jobs, clip_results) if job[2] == split]
        written = [it for job, res in zip(clip_jobs, clip_results) if job[2] == split for it in res[3]]
        write_jsonl(os.path.join(args.out, f"written_{split}.jsonl"), written)  # template sentences: not the tokenizer's
        for name, items in ((split, av_items), (f"base_{split}", base_items), (f"image_{split}", image_items),
                            (f"align_{split}", align_items), (f"text_{split}", text_items), (f"copy_{split}", copy_items)):
            write_jsonl(os.path.join(args.out, f"{name}.jsonl"), items)
            texts += [line for it in items for t in (it["prompt"], it["response"]) for line in t.split("\n")]
    tok = train_tokenizer(texts, os.path.join(args.out, "tokenizer.json"))
    seconds = time.time() - t0
    with open(meta_path, "w") as f:  # written last: a world cut short is not kept
        json.dump({"seed": args.seed, "small": args.small, "generator": generator, "seconds": round(seconds, 1)}, f)
    print(f"wrote {len(clip_jobs)} clips, {len(audio_jobs)} audio-only items and a {tok.get_vocab_size()}-token "
          f"tokenizer to {args.out} in {seconds:.1f} s")


def repeat_item(item):
    """A text-only item: the response written out where the media would be (a text-only item's media block is
    empty), a blank line, then the item's own instruction; the response is to say it. A real base LLM already copies any
    text and follows these instructions; ours learns only what its training shows it, and the frozen LLM of audio
    alignment could otherwise never say a transcript, however well the aligner hears it."""
    return {"id": f"{item['id']}_text", "task": "text", "prompt": f"{item['response']}\n\n{item['prompt']}",
            "response": item["response"]}


def copy_item(split, seed, i):
    """A text-only item: 1-6 random words of the toy language, with runs of blanks before, between and after them,
    to say again without the blanks. Text that no template predicts is what teaches a small LLM to copy, and the
    blanks teach it to copy by content rather than by position: an utterance's words reach the LLM among the
    audio tokens of silence around them, which a copier that takes the first token after the prompt's start would
    say instead."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 6, i])
    words = [WORDS[w] for w in rng.integers(len(WORDS), size=int(rng.integers(1, 7)))]
    blanks = lambda: " " * int(rng.integers(0, 4))
    spaced = "".join(blanks() + (" " if n else "") + w for n, w in enumerate(words)) + blanks()
    return {"id": f"{split}_{i:04d}_copy", "task": "text", "prompt": f"{spaced}\n\n{ASR_PROMPT}",
            "response": " ".join(words)}


def read_item(caption, qa):
    """A text-only question: a clip's caption, then one of its multiple-choice questions about it, answered as the clip's
    question is (one question a clip). Reading a text and picking the option it supports is another skill a real base LLM
    brings."""
    return {"id": f"{qa['id']}_text", "task": "text", "prompt": f"{caption}\n\n{qa['prompt']}", "response": qa["response"]}


if __name__ == "__main__":
    main()
