"""The 2+ audio branch (WhisperQFormer): its tokens against the Q-Former's closed form, the config read from a
2+ config.json's audio_config, token counts, and the authors' checkpoint key names."""
import math

import pytest
import torch
import torch.nn.functional as F

from encoders import WhisperConfig
from qformer import WhisperQFormer, qformer_plus_config

WHISPER = WhisperConfig(num_mel_bins=8, d_model=48, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                        max_source_positions=50)
# a 2+ audio_config as the authors' configuration_qwen2_5_vl.py writes it, sizes shrunk: 50 frames per 30 s
# chunk, so 3 s windows of 5 frames make the 10 windows per chunk
AUDIO_CONFIG = dict(num_mel_bins=8, d_model=48, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                    max_source_positions=50, second_per_window=3.0, second_stride=3.0,
                    qformer_config=dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=2,
                                        query_length=1, encoder_width=48, out_hidden_size=32, layer_norm_eps=1e-12,
                                        hidden_dropout_prob=0.1, cross_attention_freq=1, hidden_act="gelu"))


def randomised(num_query=1, seed=0):
    torch.manual_seed(seed)
    cfg = qformer_plus_config({**AUDIO_CONFIG, "qformer_config": {**AUDIO_CONFIG["qformer_config"], "query_length": num_query}})
    model = WhisperQFormer(WHISPER, cfg).eval()
    with torch.no_grad():
        for name, p in model.qformer.named_parameters():
            p.normal_(std=0.3)
        model.q_tokens.normal_(std=1.0)
        model.audio_proj.bias.normal_(std=0.3)
    return model


def closed_form(model, feats):
    """The Q-Former written out: per window (25 frames with the released config, 5 here), the
    queries, LayerNormed, go through each layer's post-LN self-attention, cross-attention to the window's
    frames and FFN, then audio_proj."""
    cfg, sd = model.qcfg, {k: v for k, v in model.qformer.bert.state_dict().items()}
    S, T, C = feats.shape
    ln = lambda x, p: F.layer_norm(x, (cfg.hidden,), sd[p + ".weight"], sd[p + ".bias"], cfg.ln_eps)
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]
    hd = cfg.hidden // cfg.heads

    def attend(x, ctx, p):  # x (Q, hidden), ctx (K, width): multi-head softmax attention, then post-LN
        q, k, v = (lin(t, f"{p}.self.{n}").view(-1, cfg.heads, hd) for t, n in ((x, "query"), (ctx, "key"), (ctx, "value")))
        a = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd), dim=-1)
        y = torch.einsum("hqk,khd->qhd", a, v).reshape(len(x), cfg.hidden)
        return ln(x + lin(y, f"{p}.output.dense"), f"{p}.output.LayerNorm")

    out = []
    for s in range(S):
        for j in range(T // cfg.window):
            frames = feats[s, j * cfg.window:(j + 1) * cfg.window]
            x = ln(model.q_tokens[0], "embeddings.LayerNorm")
            for i in range(cfg.layers):
                p = f"encoder.layer.{i}"
                x = attend(attend(x, x, f"{p}.attention"), frames, f"{p}.crossattention")
                h = F.gelu(lin(x, f"{p}.intermediate_query.dense"))
                x = ln(x + lin(h, f"{p}.output_query.dense"), f"{p}.output_query.LayerNorm")
            out.append(model.audio_proj(x))
    return torch.cat(out).view(S, -1, cfg.llm_dim)


@pytest.mark.parametrize("num_query,n_chunks", [(1, 1), (1, 3), (2, 2)])
def test_tokens_equal_closed_form(num_query, n_chunks):
    model = randomised(num_query)
    mel = torch.randn(n_chunks, 8, 100)
    with torch.no_grad():
        feats = model.features(mel)
        got = model(mel)
        expected = closed_form(model, feats)
    assert got.shape == (n_chunks, 10 * num_query, 32)
    assert (got - expected).abs().max().item() < 1e-5
    # no segment embedding: identical chunks give identical tokens wherever they are
    with torch.no_grad():
        twice = model(mel[:1].expand(2, -1, -1))
    assert torch.allclose(twice[0], twice[1], atol=1e-6)


def test_released_config_sizes():
    """The authors' defaults (configuration_qwen2_5_vl.py): the 'larger' Q-Former, 60 tokens per 30 s."""
    cfg = qformer_plus_config(dict(d_model=1280, max_source_positions=1500, qformer_config=dict(out_hidden_size=3584)))
    assert (cfg.hidden, cfg.heads, cfg.intermediate, cfg.layers, cfg.num_query) == (3072, 12, 12288, 2, 1)
    assert (cfg.window, cfg.tokens_per_segment, cfg.llm_dim, cfg.encoder_width) == (25, 60, 3584, 1280)
    assert qformer_plus_config(dict(qformer_config=dict(out_hidden_size=3584)), llm_dim=8192).llm_dim == 8192
    with pytest.raises(ValueError, match="stride"):
        qformer_plus_config(dict(second_per_window=0.5, second_stride=0.25))


def test_state_dict_is_authors_layout():
    with torch.device("meta"):
        model = WhisperQFormer(WHISPER, qformer_plus_config(AUDIO_CONFIG))
    keys = set(model.state_dict())
    expected_q = {"q_tokens", "audio_proj.weight", "audio_proj.bias", "qformer.bert.embeddings.LayerNorm.weight",
                  "qformer.bert.embeddings.LayerNorm.bias"}
    for i in range(2):
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "attention.output.LayerNorm", "crossattention.self.query", "crossattention.self.key",
                     "crossattention.self.value", "crossattention.output.dense", "crossattention.output.LayerNorm",
                     "intermediate_query.dense", "output_query.dense", "output_query.LayerNorm"):
            expected_q |= {f"qformer.bert.encoder.layer.{i}.{part}.{w}" for w in ("weight", "bias")}
    assert {k for k in keys if k.startswith(("qformer", "q_tokens", "audio_proj"))} == expected_q
    assert {"conv1.weight", "embed_positions.weight", "layers.1.self_attn.k_proj.weight", "layer_norm.bias"} <= keys
    assert not [k for k in keys if "ln_speech" in k or "final_linear" in k]
    assert model.state_dict()["qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (64, 48)
