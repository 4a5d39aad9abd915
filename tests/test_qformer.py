"""The window-level Q-Former audio aligner: against transformers' BERT with cross-attention, token
counts, the segment position embedding, the released checkpoint's key names, initialisation."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as hf

from checkpoint import ours_to_released, released_to_ours
from qformer import AudioAligner, QFormerConfig, segment_positions

TINY = dict(encoder_width=48, hidden=64, heads=4, intermediate=96, layers=2, window=5, frames_per_segment=50, llm_dim=32)


def official_table(d, max_len=200):
    """The release's segment embedding table, written as the official code writes it."""
    position = torch.arange(0, max_len).float()[:, None]
    div_term = torch.exp(torch.arange(0, d, 2).float() * -(math.log(10000.0) / d))
    pos_enc = torch.zeros(max_len + 1, d)
    pos_enc[1:, 0::2] = torch.sin(position * div_term)
    pos_enc[1:, 1::2] = torch.cos(position * div_term)
    return pos_enc


def randomised(cfg, seed=0):
    """An aligner in eval mode whose every parameter (LayerNorms and biases too) is random."""
    torch.manual_seed(seed)
    model = AudioAligner(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model


def hf_qformer(ours: AudioAligner):
    """transformers' BertModel with our weights: a decoder with cross-attention whose embeddings
    reduce to LayerNorm(inputs_embeds). Its cross-attention key/value read hidden_size, so they are
    swapped for encoder_width ones (LAVIS's encoder_width)."""
    c = ours.cfg
    cfg = hf.BertConfig(hidden_size=c.hidden, num_hidden_layers=c.layers, num_attention_heads=c.heads,
                        intermediate_size=c.intermediate, is_decoder=True, add_cross_attention=True,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=c.ln_eps,
                        hidden_act="gelu", attn_implementation="eager")
    ref = hf.BertModel(cfg, add_pooling_layer=False).eval()
    for layer in ref.encoder.layer:
        layer.crossattention.self.key = nn.Linear(c.encoder_width, c.hidden)
        layer.crossattention.self.value = nn.Linear(c.encoder_width, c.hidden)
    theirs = ref.state_dict()
    with torch.no_grad():
        for name, t in ours.speech_Qformer.bert.state_dict().items():
            # LAVIS runs the queries through intermediate_query/output_query, HF through its only FFN
            hf_name = name.replace("intermediate_query.", "intermediate.").replace("output_query.", "output.")
            assert theirs.pop(hf_name).shape == t.shape, hf_name
            ref.get_parameter(hf_name).copy_(t)
        assert sorted(theirs) == [f"embeddings.{e}.weight" for e in ("position_embeddings", "token_type_embeddings", "word_embeddings")]
        ref.embeddings.position_embeddings.weight.zero_()
        ref.embeddings.token_type_embeddings.weight.zero_()
    return ref


@pytest.mark.parametrize("n_seg", [1, 3])
def test_matches_transformers_bert_qformer(n_seg):
    ours = randomised(QFormerConfig(**TINY))
    ref = hf_qformer(ours)
    c = ours.cfg
    x = torch.randn(n_seg, c.frames_per_segment, c.encoder_width)
    with torch.no_grad():
        # windows cut as the release cuts them: F.unfold with kernel = stride = window
        feats = ours.ln_speech(x).transpose(1, 2).unsqueeze(2)  # (S, C, 1, T)
        cols = F.unfold(feats, kernel_size=(1, c.window), stride=(1, c.window))  # (S, C*window, n)
        windows = cols.view(n_seg, c.encoder_width, c.window, -1).permute(0, 3, 2, 1).reshape(-1, c.window, c.encoder_width)
        query = ours.speech_query_tokens.expand(windows.size(0), -1, -1)
        expected = ref(inputs_embeds=query, encoder_hidden_states=windows).last_hidden_state
        got = ours.query_states(x)
        assert got.shape == (n_seg * 10, 1, c.hidden)
        assert (got - expected).abs().max().item() < 1e-5
        tokens = ours.final_linear(ours.speech_llama_proj(expected)).view(n_seg, -1, c.llm_dim)
        tokens = (tokens + official_table(c.llm_dim)[:n_seg, None]).reshape(-1, c.llm_dim)
        assert (ours(x) - tokens).abs().max().item() < 1e-5


def test_token_counts_released_sizes():
    cfg = QFormerConfig(llm_dim=64)  # the released sizes but a narrow LLM, to stay fast
    assert cfg.tokens_per_segment == 60
    model = AudioAligner(cfg).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1500, 1280)).shape == (60, 64)
        assert model(torch.randn(2, 1500, 1280)).shape == (120, 64)


@pytest.mark.parametrize("num_query", [1, 3])
def test_token_counts_scale_with_config(num_query):
    cfg = QFormerConfig(**TINY, num_query=num_query)
    assert cfg.tokens_per_segment == 10 * num_query
    model = AudioAligner(cfg).eval()
    with torch.no_grad():
        for n_seg in (1, 2, 5):
            assert model(torch.randn(n_seg, 50, 48)).shape == (n_seg * 10 * num_query, 32)
        # like the release's unfold, a trailing partial window is dropped
        assert model(torch.randn(2, 53, 48)).shape == (2 * 10 * num_query, 32)


def test_segment_positions_equal_release_table():
    for d in (32, 3584):
        assert torch.equal(segment_positions(201, d), official_table(d))
    pe = segment_positions(2, 8)
    assert torch.equal(pe[0], torch.zeros(8)) and torch.equal(pe[1], torch.tensor([0.0, 1.0] * 4))


def test_segment_embedding_is_added_per_segment():
    model = randomised(QFormerConfig(**TINY))
    a, b = torch.randn(2, 1, 50, 48)
    with torch.no_grad():
        one, other, two = model(a), model(b), model(torch.cat([a, b]))
    n = model.cfg.tokens_per_segment
    assert torch.allclose(two[:n], one, atol=1e-5)  # segment 0 gets the zero row (batching changes rounding)
    assert torch.allclose(two[n:] - other, torch.tensor([0.0, 1.0] * 16).expand(n, -1), atol=1e-5)


def released_keys(layers=2, final_linear=True):
    keys = ["ln_speech.weight", "ln_speech.bias", "speech_query_tokens", "speech_llama_proj.weight",
            "speech_llama_proj.bias", "speech_Qformer.bert.embeddings.LayerNorm.weight",
            "speech_Qformer.bert.embeddings.LayerNorm.bias"]
    if final_linear:
        keys += [f"final_linear.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    parts = [f"{a}.{m}" for a in ("attention", "crossattention")
             for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")]
    parts += ["intermediate_query.dense", "output_query.dense", "output_query.LayerNorm"]
    return keys + [f"speech_Qformer.bert.encoder.layer.{i}.{m}.{p}" for i in range(layers) for m in parts
                   for p in ("weight", "bias")]


@pytest.mark.parametrize("final_linear", [True, False])
def test_state_dict_is_released_layout(final_linear):
    with torch.device("meta"):
        model = AudioAligner(QFormerConfig(final_linear=final_linear))
    state = model.state_dict()
    assert sorted(state) == sorted(released_keys(final_linear=final_linear))
    assert not [k for k in state if ".intermediate." in k or (".output.dense" in k and "attention" not in k)]
    shapes = {"speech_query_tokens": (1, 1, 768), "ln_speech.weight": (1280,),
              "speech_Qformer.bert.encoder.layer.0.crossattention.self.key.weight": (768, 1280),
              "speech_Qformer.bert.encoder.layer.1.attention.self.key.weight": (768, 768),
              "speech_Qformer.bert.encoder.layer.1.intermediate_query.dense.weight": (3072, 768),
              "speech_llama_proj.weight": (3584, 768)}
    for k, shape in shapes.items():
        assert state[k].shape == shape, k
    norms = [m for m in model.speech_Qformer.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 7 and all(m.eps == 1e-12 for m in norms) and model.ln_speech.eps == 1e-5
    # the whole model's loader maps each key to the aligner below "audio." and back
    for k in state:
        assert released_to_ours(k) == "audio." + k and ours_to_released("audio." + k) == k


def test_initialisation():
    torch.manual_seed(0)
    model = AudioAligner(QFormerConfig(llm_dim=64))
    q = model.speech_query_tokens
    assert abs(q.std().item() - 0.02) < 0.002 and abs(q.mean().item()) < 0.003
    dense = model.speech_Qformer.bert.encoder.layer[0].crossattention.self.key
    assert abs(dense.weight.std().item() - 0.02) < 0.001 and not dense.bias.any()


def test_dropout_only_in_training():
    model = randomised(QFormerConfig(**TINY))
    x = torch.randn(1, 50, 48)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))
