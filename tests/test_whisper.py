"""Our Whisper encoder and log-mel front end against transformers on the same weights and audio."""
import numpy as np
import pytest
import torch
import transformers as hf

from data import log_mel_spectrogram
from encoders import WhisperEncoder

SR = 16000


def tone_and_noise():
    t = np.arange(int(SR * 7.3)) / SR  # shorter than 30 s: exercises the padding
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t)).astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 0.3, SR * 31).astype(np.float32)  # longer: exercises the trim
    return {"tone": tone, "noise": noise}


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("kind", ["tone", "noise"])
def test_log_mel_equals_whisper_feature_extractor(n_mels, kind):
    audio = tone_and_noise()[kind]
    ref = hf.WhisperFeatureExtractor(feature_size=n_mels)(audio, sampling_rate=SR, return_tensors="np").input_features[0]
    ours = log_mel_spectrogram(audio, n_mels)
    assert ours.shape == (n_mels, 3000)
    assert np.abs(ours.numpy() - ref).max() < 1e-4


def save_hf_whisper(path, n_mels, full_model=True, seed=0):
    torch.manual_seed(seed)
    cfg = hf.WhisperConfig(num_mel_bins=n_mels, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                           encoder_ffn_dim=96, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                           vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    ref = (hf.WhisperForConditionalGeneration if full_model else hf.WhisperModel)(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    ref.save_pretrained(path)
    return ref.get_encoder()


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("full_model", [True, False], ids=["ForConditionalGeneration", "WhisperModel"])
def test_encoder_matches_transformers(tmp_path, n_mels, full_model):
    ref = save_hf_whisper(tmp_path, n_mels, full_model)
    ours = WhisperEncoder.from_pretrained(tmp_path).eval()
    mel = torch.stack([log_mel_spectrogram(a, n_mels) for a in tone_and_noise().values()])
    with torch.no_grad():
        out = ours(mel)
        diff = (out - ref(mel).last_hidden_state).abs().max().item()
    assert out.shape == (2, 1500, 64)
    assert diff <= 1e-4


def test_encoder_rejects_wrong_length(tmp_path):
    save_hf_whisper(tmp_path, 80)
    with pytest.raises(AssertionError, match="expected mel"):
        WhisperEncoder.from_pretrained(tmp_path)(torch.zeros(1, 80, 2999))
