"""
Data for video-SALMONN 2: the Whisper log-mel front end, PyAV video and audio decoding, the frozen-feature
cache, and the Qwen2 chat format.
"""
import csv
import hashlib
import json
import logging
import math
import os
import sys
import zlib
from dataclasses import dataclass
from functools import lru_cache

import av
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
import torch.distributed as dist
from safetensors.torch import save_file
from tokenizers import Tokenizer

from config import UserError
from encoders import CHUNK_LENGTH, HOP_LENGTH, N_FFT, SAMPLE_RATE

N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a 30 s chunk

# -----------------------------------------------------------------------------
# log-mel spectrogram, equal to Whisper's (and transformers' WhisperFeatureExtractor)


def _hz_to_mel(f):  # Slaney's scale: linear below 1 kHz, logarithmic above
    f = np.asarray(f, dtype=np.float64)
    return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4))


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)))


@lru_cache(maxsize=None)
def mel_filters(n_mels, sr=SAMPLE_RATE, n_fft=N_FFT):
    """Slaney-normalised triangular mel filters (n_mels, n_fft // 2 + 1), as librosa.filters.mel."""
    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))  # (n_mels + 2,)
    slopes = edges[None, :] - fft_freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / np.diff(edges)[:-1]
    up = slopes[:, 2:] / np.diff(edges)[1:]
    weights = np.maximum(0.0, np.minimum(down, up))  # (n_freqs, n_mels)
    weights *= 2.0 / (edges[2:] - edges[:-2])  # equal area per filter
    return torch.from_numpy(weights.T.astype(np.float32))


def log_mel_spectrogram(audio, n_mels=80, n_samples=N_SAMPLES):
    """Log-mel of 16 kHz mono audio, padded or trimmed to n_samples -> (n_mels, n_samples // HOP_LENGTH)."""
    audio = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    audio = torch.nn.functional.pad(audio[:n_samples], (0, max(0, n_samples - audio.numel())))
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2  # (n_freqs, frames): the last frame only sees padding
    log_spec = torch.clamp(mel_filters(n_mels) @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)  # an 80 dB floor below the peak
    return (log_spec + 4.0) / 4.0


# -----------------------------------------------------------------------------
# video and audio decoding with PyAV (paper sections 3.1 and 4.1)

FPS = 1.0  # frames sampled per second of video
MAX_FRAMES = 110  # m: a longer video gives m frames spread over its whole length
IMAGE_SIZE = 384  # SigLIP's input side: frames are squashed to a square, no crop
IMAGE_MEAN = IMAGE_STD = 0.5  # SigLIP's normalisation, mapping [0, 1] to [-1, 1]
MIN_AUDIO_SECONDS = 1.0  # a shorter audio is zero-padded to this, as the released code pads

log = logging.getLogger(__name__)
_warned_silent = set()  # files already reported as having no audio: one warning per file, not per epoch


class MediaError(UserError):
    """A video or audio file that cannot be used: missing, empty, truncated, corrupt, or without video."""


@dataclass
class Media:
    frames: torch.Tensor  # (F, 3, S, S) float32 in [-1, 1]; None for an audio-only item
    times: list  # seconds at which each frame was taken
    mel: torch.Tensor  # (n_segments, n_mels, segment_seconds * 100) log-mel of 16 kHz mono audio
    duration: float  # seconds of video
    has_audio: bool  # False: the mel is that of silence


def _media_error(path, err):  # one line naming the file; FFmpeg's own message often names only the call
    return MediaError(f"{path}: {getattr(err, 'strerror', None) or err}")


def sample_frame_indices(n_frames, native_fps, fps=FPS, max_frames=MAX_FRAMES):
    """Indices of the frames to keep: every round(native_fps / fps)-th from frame 0, as the official code.

    Past max_frames of those, the paper lowers the rate to floor(m / T) fps, which is 0 once T > m seconds;
    like the official code we keep max_frames frames spread uniformly from the first to the last instead."""
    idx = np.arange(0, max(1, n_frames), max(1, round(native_fps / fps)))
    return idx if len(idx) <= max_frames else np.linspace(0, n_frames - 1, max_frames).astype(int)


def load_frames(path, fps=FPS, max_frames=MAX_FRAMES, image_size=IMAGE_SIZE):
    """The sampled frames of a video's first video stream
    -> ((F, 3, S, S) float32 in [-1, 1], their times in s, duration in s)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # every frame is decoded (sequentially, no seeking), so use all cores
            rate = float(stream.average_rate or 0)
            # the video stream's own duration; containers without one (mkv, webm) give only the longest stream's
            duration = float(stream.duration * stream.time_base if stream.duration else (container.duration or 0) / av.time_base)
            if not rate or not duration:
                raise MediaError(f"{path}: unknown frame rate or duration")
            counted = stream.frames  # mp4 counts its frames; other containers give only a duration to estimate from
            n_frames = counted or round(duration * rate)
            wanted, picked, count = sample_frame_indices(n_frames, rate, fps, max_frames), [], 0
            for count, frame in enumerate(container.decode(stream), 1):
                while len(picked) < len(wanted) and wanted[len(picked)] == count - 1:  # linspace may repeat an index
                    rgb = frame.reformat(format="rgb24")  # then scale: swscale's scaling yuv-to-rgb is 1-2 levels dark
                    picked.append(rgb.to_ndarray(width=image_size, height=image_size, interpolation="BICUBIC"))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise _media_error(path, e) from e
    # the metadata may promise a few frames more than decoding yields (an estimate, edit lists): those repeat
    # the last frame; missing over a second of counted frames means a truncated file (frame threading hides its error)
    if count == 0 or count < counted - rate:
        raise MediaError(f"{path}: only {count} of {n_frames} frames decode (truncated?)")
    picked += [picked[-1]] * (len(wanted) - len(picked))
    x = torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2).float() / 255.0  # (F, 3, S, S) in [0, 1]
    return (x - IMAGE_MEAN) / IMAGE_STD, [i / rate for i in wanted], duration


def fit_audio(audio, duration):
    """Audio as the released code fits it to a video: trimmed to the video's duration, zero-padded to at least
    MIN_AUDIO_SECONDS, never padded up to the video's duration (a 31 s video with 29.5 s of audio keeps one 30 s
    segment, 60 tokens, not two)."""
    n_min = round(MIN_AUDIO_SECONDS * SAMPLE_RATE)
    audio = audio[:max(n_min, round(duration * SAMPLE_RATE))]
    return np.pad(audio, (0, max(0, n_min - len(audio))))


def load_audio(path):
    """16 kHz mono float32 audio (samples,) of a file's first audio stream, None if it has none."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            decoded = container.decode(container.streams.audio[0])
            chunks = [f.to_ndarray()[0] for frame in decoded for f in resampler.resample(frame)]
            chunks += [f.to_ndarray()[0] for f in resampler.resample(None)]  # flush what the resampler holds back
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise _media_error(path, e) from e
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def segment_log_mels(audio, n_mels=80, segment_seconds=CHUNK_LENGTH):
    """Log-mel of each segment_seconds piece of 16 kHz audio, the last zero-padded
    -> (ceil(len(audio) / segment samples), n_mels, segment samples // HOP_LENGTH); each piece is one Whisper input."""
    n = round(segment_seconds * SAMPLE_RATE)
    return torch.stack([log_mel_spectrogram(audio[i:i + n], n_mels, n) for i in range(0, len(audio), n)])


def load_video(path, fps=FPS, max_frames=MAX_FRAMES, image_size=IMAGE_SIZE, n_mels=80,
               segment_seconds=CHUNK_LENGTH, audio_path=None):
    """Frames and audio log-mels of a video; the audio comes from audio_path when given, else from the video,
    else is silence. With no video (path None: an audio-only item) frames is None and the duration is the
    audio's. Raises MediaError for a file that cannot be used."""
    if path is None:
        audio = load_audio(str(audio_path))
        if audio is None:
            raise MediaError(f"{audio_path}: no audio stream")
        audio = fit_audio(audio, len(audio) / SAMPLE_RATE)
        return Media(None, [], segment_log_mels(audio, n_mels, segment_seconds), len(audio) / SAMPLE_RATE, True)
    frames, times, duration = load_frames(path, fps, max_frames, image_size)
    source = str(audio_path or path)
    audio = load_audio(source)
    has_audio = audio is not None
    if not has_audio and source not in _warned_silent:
        _warned_silent.add(source)
        log.warning("%s: no audio stream, using silence", source)
    if not has_audio:  # ours: silence as long as the video
        audio = np.zeros(round(duration * SAMPLE_RATE), np.float32)
    audio = fit_audio(audio, duration)
    return Media(frames, times, segment_log_mels(audio, n_mels, segment_seconds), duration, has_audio)


# -----------------------------------------------------------------------------
# frozen-feature cache: a video's tower and Whisper outputs, computed once for every epoch and MrDPO round


def cache_key(path, audio_path, fingerprint, prep):
    """Changes with either file (its role, path, size, mtime: one file as an item's audio and as a video are two
    entries), the encoders and every preprocessing constant: the settings in prep and the fixed ones of this file
    (editing one recomputes every cached item)."""
    files = [(role, os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns)
             for role, p in (("video", path), ("audio", audio_path)) if p]
    fixed = [SAMPLE_RATE, N_FFT, HOP_LENGTH, CHUNK_LENGTH, IMAGE_MEAN, IMAGE_STD, MIN_AUDIO_SECONDS]
    return hashlib.sha256(json.dumps([files, fingerprint, sorted(prep.items()), fixed]).encode()).hexdigest()[:32]


def media_features(path, encode, fingerprint="", cache_dir=None, audio_path=None, **prep):
    """(vision features, audio features, frame times, duration) of a video, on the CPU. encode(frames, mel)
    runs the frozen encoders; with cache_dir their outputs are kept in a safetensors file per key."""
    file = None
    if cache_dir:
        for p in (path, audio_path):
            if p and not os.path.exists(p):
                raise MediaError(f"{p}: no such file")
        file = os.path.join(cache_dir, cache_key(path, audio_path, fingerprint, prep) + ".safetensors")
        if os.path.exists(file):
            try:
                with safe_open(file, framework="pt") as f:
                    meta, names = f.metadata(), set(f.keys())
                    vis, aud = (f.get_tensor(k) if k in names else None for k in ("vision", "audio"))  # an item may lack either
                    return vis, aud, json.loads(meta["times"]), float(meta["duration"])
            except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:  # cut short by a copy, a full disk
                log.warning("%s: unreadable cache entry (%s), computed again", file, e)
    media = load_media(path, audio_path, prep)
    vis, aud = (t if t is None else t.cpu().contiguous() for t in encode(media.frames, media.mel))
    if file:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{file}.{os.getpid()}.tmp"  # written whole, then renamed: a crash never leaves half a file
        tensors = {k: t for k, t in (("vision", vis), ("audio", aud)) if t is not None}
        save_file(tensors, tmp, metadata={"times": json.dumps(media.times), "duration": str(media.duration)})
        os.replace(tmp, file)
    return vis, aud, media.times, media.duration


SILENCE = "Ġ"  # a space in byte-level BPE (the toy's and Qwen2's): what a soundless 0.5 s window is written as


def soundtrack_words(key):
    """A toy audio event's key -> the words it is written as: an utterance its own, a sound its kind last
    (["tone", "low"] -> low tone, ["noise"] -> noise)."""
    return key[1].split() if key[0] == "say" else [*key[1:], key[0]]


def soundtrack_ids(tok, events, n, window):
    """An item's soundtrack written out: n token ids, one for each `window` seconds of audio, every sound and
    utterance written from the window it starts in, one token a window (the toy speaks one word to a window),
    SILENCE elsewhere; the toy LLM's stand-in for a real one reading text (training.py's written_audio)."""
    ids = [tok.token_to_id(SILENCE)] * n
    for e in events:
        if e["type"] in ("sound", "speech"):
            written = tok.encode(" " + " ".join(soundtrack_words(e["key"]))).ids
            first = int(e["start"] / window)
            ids[first:first + len(written)] = written[:max(0, n - first)]
    return ids


class Features:
    """Cached encoder features and token ids of manifest items for a model. Items whose media cannot be read (and, with
    responses=True, items without a response to train on) are dropped once, up front (every rank agrees), counted and
    named, so training and evaluation never meet them."""

    def __init__(self, model, tok, items, rank=0, world=1, fps=FPS, max_frames=MAX_FRAMES, cache_dir=None,
                 use_audio=True, responses=True, written_audio=False):
        cfg = model.cfg
        self.tok, self.written_audio = tok, written_audio
        self.model, self.cache_dir, self.use_audio = model, cache_dir, use_audio
        self.prep = cfg.media_prep(fps, max_frames)
        self.fingerprint = model.encoder_fingerprint()
        bad = set()
        for i in range(rank, len(items), world):  # check, and warm the cache: each rank its share
            problem = "no response to train on" if responses and not isinstance(items[i].get("response"), str) else None
            if problem is None:
                try:
                    self.features(items[i])
                except MediaError as e:
                    problem = e
            if problem is None and written_audio and "events" in items[i]:
                try:
                    soundtrack_ids(tok, items[i]["events"], 1, 0.5)
                except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                    problem = f"events: not a soundtrack to write ({type(e).__name__}: {e})"
            if problem:
                print(f"skipped bad sample ({items[i].get('line', i)}): {problem}", flush=True)
                bad.add(i)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, bad)
            bad = set().union(*gathered)
        self.skipped = len(bad)
        self.items = [it for i, it in enumerate(items) if i not in bad]
        prompt, response = chat_format(self.prep)
        self.ids = [(prompt(tok, it["prompt"]), response(tok, it["response"]) if responses else None) for it in self.items]

    def features(self, item):
        if not (item.get("video") or item.get("audio")):
            return None, None, [], 0.0  # a text-only item
        vis, aud, times, duration = media_features(item.get("video"), self.model.encode, self.fingerprint,
                                                   self.cache_dir, item.get("audio"), **self.prep)
        return vis, aud if self.use_audio else None, times, duration

    def example(self, i, dev):
        """(features on dev, prompt ids, response ids) of item i: one entry of a VideoSALMONN2 forward batch."""
        item = self.items[i]
        vis, aud, times, duration = self.features(item)
        if self.written_audio and aud is not None and "events" in item:
            T = self.model.cfg.qformer.tokens_per_segment
            window = self.model.cfg.segment_seconds / T
            aud = torch.tensor(soundtrack_ids(self.tok, item["events"], aud.size(0) * T, window)).view(-1, T)  # (S, T)
        feats = (None if vis is None else vis.to(dev), None if aud is None else aud.to(dev), times, duration)
        return (feats, *self.ids[i])


# -----------------------------------------------------------------------------
# manifests: JSONL, one item a line, media paths relative to the manifest
#   {"video": "clips/a.mp4", "prompt": "...", "response": "...", "events": [...], "task": "caption"}
#   {"audio": "audio/b.wav", "prompt": "Please transcribe the speech.", "response": "...", "task": "asr"}
#   {"prompt": "Repeat after me: ...", "response": "...", "task": "text"}  (no media)
# and the released test set's {"video", "conversations": [{"from": "human", "value": "<image>\nPROMPT"}, ...]}


# the type of each field a manifest item may have; an item with another is skipped, its file, line and field named
FIELD_TYPES = {"video": str, "audio": str, "prompt": str, "response": str, "task": str, "events": list, "id": (str, int),
               "answer": str, "question": str, "options": list}


def check_fields(item):
    """ValueError naming the first field of the wrong type (a string of events would become one event per character)."""
    for key, kind in FIELD_TYPES.items():
        if key in item and not isinstance(item[key], kind):
            raise ValueError(f"field {key!r} must be {getattr(kind, '__name__', 'str or int')}, "
                             f"got {type(item[key]).__name__} {_snippet(item[key])}")
    for e in item.get("events", []):  # sentences, or the toy's dicts with the sentence under "text"
        if not (isinstance(e, str) or (isinstance(e, dict) and isinstance(e.get("text"), str))):
            raise ValueError(f"field 'events' must be a list of sentences, got an element {_snippet(e)}")
    if not all(isinstance(o, str) for o in item.get("options", [])):
        raise ValueError("field 'options' must be a list of strings")


def _snippet(value, limit=40):
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


def read_manifest(path, prepare=None):
    """The items of a manifest; a malformed line or a field of the wrong type is reported with its file and line
    number, and skipped. prepare(item) may complete an item before it is checked (eval.py builds QA prompts).
    A missing file, or one that is not UTF-8, is a UserError."""
    items, root = [], os.path.dirname(os.path.abspath(path))
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read the manifest: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#x}); convert it, e.g. with "
                        f"iconv -f latin1 -t utf-8") from e
    if text.lstrip().startswith("["):  # the released test set is one JSON list: its items count as lines
        try:
            text = "\n".join(json.dumps(x) for x in json.loads(text))
        except ValueError as e:
            raise UserError(f"{path}: not a JSON list nor JSON lines: {e}") from e
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("not a JSON object")
            if "conversations" in item:
                turns = item.pop("conversations")
                item["prompt"] = turns[0]["value"].replace("<image>", "").strip()
                item["response"] = next((t["value"] for t in turns[1:] if t["from"] == "gpt"), "")
            if prepare:
                prepare(item)
            check_fields(item)
            if not isinstance(item.get("prompt"), str) or not (item.get("video") or item.get("audio") or item.get("task") == "text"):
                raise ValueError("an item needs a prompt and a video or an audio file (or task text)")
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
            log.warning("%s:%d: skipped: %s", path, n, e)
            continue
        item["line"] = f"{path}:{n}"
        item.setdefault("task", "caption")  # the released SFT, DPO and test-set items are captions
        for key in ("video", "audio"):
            if item.get(key):
                item[key] = os.path.join(root, item[key])
        items.append(item)
    return items


# -----------------------------------------------------------------------------
# Qwen2 chat format

SYSTEM = "You are a helpful assistant."


def load_tokenizer(path):
    """A tokenizers.Tokenizer from tokenizer.json (a file, or a checkpoint directory holding one)."""
    file = str(path) if str(path).endswith(".json") else os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise UserError(f"{file}: no such tokenizer file (pass --tokenizer=FILE, e.g. Qwen2-7B-Instruct's tokenizer.json)")
    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise UserError(f"{file}: not a tokenizer.json ({e})") from e


def encode_prompt(tok, prompt, system=SYSTEM):
    """Token ids before and after the audio-visual block of the Qwen2 chat prompt
        <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n[AV]\\n\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n
    tokenized piece by piece as the released model was trained (LLaVA-NeXT's preprocess_qwen): the
    "\\n" after [AV] and the "\\n{prompt}" are separate pieces, not one "\\n\\n" token."""
    ids = lambda text: tok.encode(text, add_special_tokens=False).ids
    start, end, nl = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>"), ids("\n")
    before = [start] + ids("system") + nl + ids(system) + [end] + nl + [start] + ids("user") + nl
    after = nl + ids("\n" + prompt) + [end] + nl + [start] + ids("assistant") + nl
    return before, after


def encode_response(tok, text):
    """The assistant's answer and the <|im_end|> that ends it: the labelled part of a sequence."""
    return tok.encode(text, add_special_tokens=False).ids + [tok.token_to_id("<|im_end|>")]


def merge_results(path, metrics, seconds):
    """Add {stage: metrics} and {stage: seconds} to a results file (written whole, then renamed). A file that is not
    one (cut short, a merge conflict) is left as it is for its owner to mend, and the metrics, hours of work, go to
    PATH.new.json instead, merged there likewise; then a UserError names both."""
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
        if not isinstance(res, dict) or not isinstance(res.get("seconds", {}), dict):
            raise ValueError("not a JSON object of results")
    except FileNotFoundError:
        res = {}
    except ValueError as e:
        aside = path + ".new.json"
        merge_results(aside, metrics, seconds)
        raise UserError(f"{path}: cannot add to it ({e}); left as it is, this run's results are in {aside}") from e
    res.update(metrics)
    res.setdefault("seconds", {}).update({k: round(v, 1) for k, v in seconds.items()})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)
    return res


def read_records(path, fields=None):
    """The records of a JSONL file that a run appends to as it goes (captions, MrDPO samples). A crash while appending
    (power loss, a full disk) can leave the last line cut off: it is dropped, the file rewritten without it, so its
    item is made again. A bad line before the last is no crash's doing: a UserError naming it; so is a record that is
    not an object with the fields ({key: type}) given."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")  # every whole record ends with a newline: the last piece is "" or the torn line
    if lines[-1]:
        print(f"{path}: dropped its cut-off last line (a crash while writing it); that item is made again", flush=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines[:-1]))
        os.replace(path + ".tmp", path)
    records = []
    for n, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{n}: not a JSON record ({e}); delete the line to make its item again") from e
        if fields and not (isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in fields.items())):
            kinds = {k: " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,))) for k, t in fields.items()}
            wanted = ", ".join(f"{k!r} ({kind})" for k, kind in kinds.items())
            raise UserError(f"{path}:{n}: not a record with {wanted}; delete the line to make its item again")
        records.append(record)
    return records


def decode_response(tok, ids):
    """A generated answer's text, and whether it ended with <|im_end|> (rather than at the token limit)."""
    finished = bool(ids) and ids[-1] == tok.token_to_id("<|im_end|>")
    return tok.decode(ids, skip_special_tokens=True).strip(), finished


# -----------------------------------------------------------------------------
# what the preparers of the public datasets share (data/<name>/prepare.py): they turn a downloaded layout into
# manifests, naming and counting every row they leave out


class Skips:
    """Rows a preparer leaves out: each named in one line (file:row: skipped: reason), counted by reason."""

    def __init__(self):
        self.counts = {}

    def __call__(self, where, reason, detail=""):
        print(f"{where}: skipped: {reason}" + (f" ({detail})" if detail else ""), flush=True)
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def summary(self, name, written):
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.counts.items()))
        print(f"{name}: written {written}, skipped {sum(self.counts.values())}" + (f" ({reasons})" if reasons else ""))


def bad_layout(message):
    """A --root that is not the layout a preparer reads: one line saying what was expected, exit status 2."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def table_rows(path, columns, skips, known=()):
    """(line number, row dict) of a CSV file, or of a TSV file read as Common Voice writes them (no quoting). A file
    without the columns is not the expected layout; columns neither read nor known are named once and ignored; a
    row with too few or too many fields is named and skipped."""
    tsv = path.endswith(".tsv")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        header = reader.fieldnames or []
        if missing := [c for c in columns if c not in header]:
            bad_layout(f"{path}: expected the columns {', '.join(columns)}; it has no {', '.join(missing)}")
        if extra := [c for c in header if c not in columns + known]:
            print(f"{path}: columns not read: {', '.join(extra)}")
        for row in reader:
            if None in row or None in row.values():
                skips(f"{path}:{reader.line_num}", "malformed row", f"{len(header)} fields expected")
            else:
                yield reader.line_num, row


def write_manifest(path, items):
    """Write items as a JSONL manifest (whole, then renamed), their media paths made relative to it -> how many."""
    root = os.path.dirname(os.path.abspath(path))
    os.makedirs(root, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for it in items:
            rel = {k: os.path.relpath(it[k], root) for k in ("video", "audio") if it.get(k)}
            f.write(json.dumps({**it, **rel}, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {len(items)} items to {path}")
    return len(items)


AUDIBLE_RMS = 0.01  # a second of audio is heard above this RMS (-40 dBFS); below, it is near silence


def audible_fraction(path):
    """The fraction of a file's seconds whose audio is heard (RMS over AUDIBLE_RMS), 0.0 without an audio stream:
    our measure of "rich audio" for the SFT videos (paper 4.2 selects them but does not say how)."""
    audio = load_audio(path)
    if audio is None or not len(audio):
        return 0.0
    seconds = np.array_split(audio, max(1, len(audio) // SAMPLE_RATE))
    return float(np.mean([np.sqrt(np.mean(s.astype(np.float64) ** 2)) > AUDIBLE_RMS for s in seconds]))


def lacks_audio(path, min_audio):
    """Why a video fails the SFT preparers' --min_audio filter, as (reason, detail), or None when it passes."""
    if min_audio <= 0:
        return None
    try:
        heard = audible_fraction(path)
    except MediaError as e:
        return "unreadable video", str(e)
    return None if heard >= min_audio else ("too little audio", f"heard in {heard:.0%} of its seconds, --min_audio={min_audio}")


def held_out(key, fraction):
    """Whether an item goes to the validation split: a hash of its key, so the split does not depend on row order."""
    return zlib.crc32(key.encode()) % 10000 < fraction * 10000


# -----------------------------------------------------------------------------
# video-SALMONN 2+ (Qwen2.5-VL): frames at 10 fps, Qwen2-VL's smart resize, 2-frame patches (qwenvl/data/dataset.py)

PLUS_INTERVAL = 0.1  # seconds between sampled frames (--interval 0.1: 10 fps)
PLUS_MIN_FRAMES = 64  # train.sh (the authors' inference uses 16)
PLUS_MAX_FRAMES = 768
PLUS_MAX_PIXELS = 61250  # per frame, scaled up when a video yields fewer than PLUS_MAX_FRAMES frames
PLUS_MIN_PIXELS = 784  # 28 x 28
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, Qwen2-VL's processor's
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VideoPlus:
    pixel_values_videos: torch.Tensor  # (t*h*w, 3 * 2 * 14 * 14) float32 patches in the processor's order
    video_grid_thw: torch.Tensor  # (3,) temporal grids, patch rows, patch columns
    second_per_grid_ts: float  # seconds per temporal grid: 2 / effective fps
    duration: float


def plus_frame_indices(n_frames, duration, interval=PLUS_INTERVAL, min_frames=PLUS_MIN_FRAMES, max_frames=PLUS_MAX_FRAMES):
    """round(duration / interval) frames, kept within [min_frames, max_frames], spread evenly from the first
    frame to the last (repeats dropped), as the authors' torchcodec path samples them."""
    target = min(max(round(duration / interval), min_frames), max_frames)
    return np.unique(np.linspace(0, n_frames - 1, target, dtype=int))


def smart_resize(height, width, factor=28, min_pixels=PLUS_MIN_PIXELS, max_pixels=PLUS_MAX_PIXELS):
    """Qwen2-VL's: both sides multiples of factor, the area within [min_pixels, max_pixels], the aspect ratio
    kept as closely as that allows."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} over 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def plus_pixel_values(frames, min_pixels=PLUS_MIN_PIXELS, max_pixels=PLUS_MAX_PIXELS, patch=14, merge=2, temporal=2):
    """uint8 RGB frames (F, 3, H, W) -> (pixel_values (t*h*w, 3*temporal*patch^2) float32, grid_thw (3,)),
    as Qwen2-VL's video processor makes them: bicubic antialiased resize to the smart size (on uint8, as
    torchvision does on the CPU), the last frame repeated to an even count, CLIP normalisation, then each
    2-frame 14 x 14 patch flattened (channel, time, row, column), patches ordered 2 x 2 merge block by block."""
    F_, C, H, W = frames.shape
    h, w = smart_resize(H, W, patch * merge, min_pixels, max_pixels)
    if (h, w) != (H, W):
        frames = torch.nn.functional.interpolate(frames, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    if F_ % temporal:
        frames = torch.cat([frames, frames[-1:].expand(temporal - F_ % temporal, -1, -1, -1)])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (CLIP_MEAN, CLIP_STD))
    x = (frames.float() - mean) / std  # rescale by 1/255 and normalise in one step, as the processor fuses them
    t, gh, gw = x.size(0) // temporal, h // patch, w // patch
    x = x.view(t, temporal, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, gh/m, gw/m, m, m, C, temporal, patch, patch)
    return x.reshape(t * gh * gw, C * temporal * patch * patch), torch.tensor([t, gh, gw])


def load_video_plus(path, interval=PLUS_INTERVAL, min_frames=PLUS_MIN_FRAMES, max_frames=PLUS_MAX_FRAMES,
                    min_pixels=PLUS_MIN_PIXELS, max_pixels=PLUS_MAX_PIXELS):
    """A video's 2+ visual input. Fewer frames than max_frames buy more pixels per frame (max_pixels times
    0.95 * max_frames / n, the authors' rule). Raises MediaError for a file that cannot be used."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or 0)
            counted = stream.frames
            duration = float(stream.duration * stream.time_base if stream.duration else (container.duration or 0) / av.time_base)
            if not rate or not (counted or duration):
                raise MediaError(f"{path}: unknown frame rate or duration")
            n_frames = counted or round(duration * rate)
            duration = n_frames / rate  # the authors' video length: frames / average fps
            wanted, picked, count = plus_frame_indices(n_frames, duration, interval, min_frames, max_frames).tolist(), [], 0
            for count, frame in enumerate(container.decode(stream), 1):
                if len(picked) < len(wanted) and wanted[len(picked)] == count - 1:
                    picked.append(frame.to_ndarray(format="rgb24"))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise _media_error(path, e) from e
    if count == 0 or count < counted - rate:  # as load_frames: over a second of counted frames missing
        raise MediaError(f"{path}: only {count} of {n_frames} frames decode (truncated?)")
    picked += [picked[-1]] * (len(wanted) - len(picked))  # metadata promising a few frames more than decode
    frames = torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2)  # (F, 3, H, W) uint8
    n = len(wanted)
    if n < max_frames:
        max_pixels = 0.95 * max_frames / n * max_pixels
    try:
        pixels, grid = plus_pixel_values(frames, min_pixels, max_pixels)
    except ValueError as e:  # smart_resize refuses an aspect ratio over 200, as Qwen2-VL does
        raise _media_error(path, e) from e
    return VideoPlus(pixels, grid, 2 / (n / duration), duration)


def load_audio_plus(path, n_mels=128):
    """A file's 2+ audio input: 16 kHz mono, zero-padded to at least 1 s but never trimmed to the video (as
    the authors' process_audio), log-mel per 30 s chunk -> ((S, n_mels, 3000), seconds); None without an audio stream."""
    audio = load_audio(path)
    if audio is None:
        return None
    audio = np.pad(audio, (0, max(0, SAMPLE_RATE - len(audio))))
    return segment_log_mels(audio, n_mels), len(audio) / SAMPLE_RATE


def encode_prompt_plus(tok, prompt, system=SYSTEM):
    """Token ids before and after the audio-visual block of the 2+ chat prompt, as the authors' template
    renders a "<video>\\nPROMPT" (or "<audio>\\n...") turn:
        <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n[block]\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n
    (one newline after the block, unlike v1's two)."""
    ids = lambda text: tok.encode(text, add_special_tokens=False).ids
    return ids(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"), ids(f"\n{prompt}<|im_end|>\n<|im_start|>assistant\n")


def encode_response_plus(tok, text):
    """The labelled part of a 2+ sequence: the answer, <|im_end|> and the newline after it (the authors mask the
    system and user turns and the assistant turn's first three tokens, <|im_start|>assistant\\n, only)."""
    return tok.encode(f"{text}<|im_end|>\n", add_special_tokens=False).ids


def chat_format(prep):
    """(prompt encoder, response encoder) of the model family whose media settings are prep."""
    return (encode_prompt_plus, encode_response_plus) if prep.get("plus") else (encode_prompt, encode_response)


def load_media_plus(path, audio_path=None, interval=PLUS_INTERVAL, min_frames=PLUS_MIN_FRAMES, max_frames=PLUS_MAX_FRAMES,
                    max_pixels=PLUS_MAX_PIXELS, min_pixels=PLUS_MIN_PIXELS, n_mels=128):
    """A 2+ item as a Media: frames are the patches (t, h, w, patch_dim), the patch grid in their shape, times each
    temporal grid's start, mel the audio of audio_path or the video (None without an audio stream: the item goes
    without audio, as the authors' code does). With no video (path None) frames is None."""
    if path is None:
        audio = load_audio_plus(str(audio_path), n_mels)
        if audio is None:
            raise MediaError(f"{audio_path}: no audio stream")
        return Media(None, [], audio[0], audio[1], True)
    v = load_video_plus(path, interval, min_frames, max_frames, min_pixels, max_pixels)
    t, h, w = v.video_grid_thw.tolist()
    audio = load_audio_plus(str(audio_path or path), n_mels)
    mel = None if audio is None else audio[0]
    if mel is None and str(audio_path or path) not in _warned_silent:
        _warned_silent.add(str(audio_path or path))
        log.warning("%s: no audio stream, the video goes without audio", audio_path or path)
    return Media(v.pixel_values_videos.view(t, h, w, -1), [i * v.second_per_grid_ts for i in range(t)], mel, v.duration, mel is not None)


def load_media(path, audio_path, prep):
    """An item's media as its model family prepares them (prep: the model config's media_prep)."""
    if prep.get("plus"):
        return load_media_plus(path, audio_path, **{k: v for k, v in prep.items() if k != "plus"})
    return load_video(path, audio_path=audio_path, **prep)
