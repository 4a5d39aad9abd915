"""
Data for video-SALMONN 2: the Whisper log-mel front end and the Qwen2 chat format.
"""
from functools import lru_cache

import numpy as np
import torch
from tokenizers import Tokenizer

from model import CHUNK_LENGTH, HOP_LENGTH, N_FFT, SAMPLE_RATE

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
# Qwen2 chat format

SYSTEM = "You are a helpful assistant."


def load_tokenizer(path):
    """A tokenizers.Tokenizer from tokenizer.json (a file, or a checkpoint directory holding one)."""
    return Tokenizer.from_file(path if path.endswith(".json") else f"{path}/tokenizer.json")


def chat_prompt(user, system=SYSTEM):
    """The Qwen2 chat template up to the assistant's turn: <|im_start|>role\\n...<|im_end|>\\n"""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
