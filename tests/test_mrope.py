"""M-RoPE of 2+: cos/sin against transformers' Qwen2.5-VL rotary embedding, position ids against
transformers' get_rope_index (video only) and the authors' training rule (audio-visual), and the audio
split over temporal grids."""
import pytest
import torch
import transformers as hf
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel, Qwen2_5_VLRotaryEmbedding

from model import av_placeholder_ids, grid_audio_counts, mrope_cos_sin, mrope_position_ids

# Qwen2.5-VL's ids (config.json); tests pass them in as the model reads them from config.json
TOKENS = dict(vision_start_token_id=151652, vision_end_token_id=151653, video_token_id=151656, audio_token_id=151665)


def test_cos_sin_match_transformers():
    cfg = hf.Qwen2_5_VLConfig(text_config=dict(hidden_size=64, num_attention_heads=2, rope_parameters=dict(
        rope_type="default", rope_theta=1e6, mrope_section=[4, 6, 6]))).text_config
    rot = Qwen2_5_VLRotaryEmbedding(cfg)
    pos = torch.randint(0, 500, (3, 2, 17))
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    ours = mrope_cos_sin(pos, 32, 1e6, (4, 6, 6), torch.float32)
    assert torch.allclose(ours[0], cos, atol=1e-6) and torch.allclose(ours[1], sin, atol=1e-6)
    # three equal rows are plain RoPE
    same = mrope_cos_sin(torch.arange(9).expand(3, -1), 32, 1e6, (4, 6, 6), torch.float32)
    from model import rope_cos_sin
    assert torch.allclose(same[0], rope_cos_sin(torch.arange(9), 32, 1e6, torch.float32)[0])


def hf_rope_index(ids, grid_thw, seconds, tokens_per_second=2):
    cfg = hf.Qwen2_5_VLConfig(vision_config=dict(tokens_per_second=tokens_per_second, spatial_merge_size=2),
                              video_token_id=TOKENS["video_token_id"])
    fake = type("M", (), {"config": cfg, "get_vision_position_ids": Qwen2_5_VLModel.get_vision_position_ids})()
    input_ids = torch.tensor([ids])
    mm = (input_ids == TOKENS["video_token_id"]).int() * 2  # token types: text 0, video 2
    pos, _ = Qwen2_5_VLModel.get_rope_index(fake, input_ids, mm, video_grid_thw=torch.tensor([grid_thw]),
                                            second_per_grid_ts=torch.tensor([seconds]))
    return pos[:, 0]


@pytest.mark.parametrize("grid,seconds", [((2, 4, 6), 1.0), ((5, 6, 4), 0.5), ((3, 2, 2), 0.2), ((4, 8, 8), 0.4)])
def test_video_only_positions_match_transformers(grid, seconds):
    before, after = [11, 12, 13], [14, 15, 16, 17]
    ids = before + av_placeholder_ids(TOKENS, grid) + after
    ours = mrope_position_ids(ids, TOKENS, video_grid_thw=[grid], second_per_grid_ts=[seconds])
    ref = hf_rope_index(ids, grid, seconds)
    n_video = len(ids) - len(after) - 1
    # text before and the video grid itself are transformers' positions exactly
    assert torch.equal(ours[:, :n_video], ref[:, :n_video])
    # the text after: the authors' (and transformers <= 5.2's) rule, the block's largest position + 1;
    # transformers >= 5.3 restarts it at start + max(h, w) / 2 instead (its issue #45381), which agrees
    # only while the video's time positions stay below that
    start = ours[:, len(before)]  # <|vision_start|>
    expected_next = int(ours[:, :n_video].max()) + 1
    assert ours[:, n_video:].tolist() == [list(range(expected_next, expected_next + len(after) + 1))] * 3
    if (grid[0] - 1) * seconds * 2 < max(grid[1], grid[2]) // 2:
        assert torch.equal(ours, ref)
    assert start.tolist() == [3, 3, 3]


def test_audio_split_worked_example():
    """official-implementation.md section 13: a 4 s clip in 4 grids (s = 1 s) with 60 audio tokens."""
    assert grid_audio_counts(60, 4, 1.0) == [2, 2, 2, 54]
    assert grid_audio_counts(60, 3, 0.2) == [0, 0, 60]  # 0.4 tokens per grid: floors 0, 0, 0
    assert grid_audio_counts(120, 5, 0.5) == [1, 1, 1, 1, 116]
    assert grid_audio_counts(60, 40, 1.0)[-11:] == [2] + [0] * 10  # past the audio's 60 tokens: nothing left
    assert sum(grid_audio_counts(60, 40, 1.0)) == 60


def test_audio_visual_positions_follow_training_rule():
    """2 grids of 2 x 2 merged tokens, 1 s per grid, 60 audio tokens: grid 0, its 2 audio tokens, grid 1,
    its 58 audio tokens; video time 0 and 2, audio (k, 0, k); the text after from the largest time + 1."""
    grid = (2, 4, 4)
    block = av_placeholder_ids(TOKENS, grid, 1.0, 60)
    v, a = TOKENS["video_token_id"], TOKENS["audio_token_id"]
    assert block == [TOKENS["vision_start_token_id"]] + [v] * 4 + [a] * 2 + [v] * 4 + [a] * 58 + [TOKENS["vision_end_token_id"]]
    ids = [1, 2] + block + [3, 4]
    pos = mrope_position_ids(ids, TOKENS, video_grid_thw=[grid], second_per_grid_ts=[1.0], audio_lengths=[60])
    s = 3  # 2 text tokens, then <|vision_start|> at 2, the block from 3
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[:, 3:7].tolist() == [[s] * 4, [s, s, s + 1, s + 1], [s, s + 1, s, s + 1]]  # grid 0
    assert pos[:, 7:9].tolist() == [[s, s + 1], [s, s], [s, s + 1]]  # audio 0, 1
    assert pos[:, 9:13].tolist() == [[s + 2] * 4, [s, s, s + 1, s + 1], [s, s + 1, s, s + 1]]  # grid 1 at time 2
    assert pos[:, 13:71].tolist() == [list(range(s + 2, s + 60)), [s] * 58, list(range(s + 2, s + 60))]
    assert pos[:, 71:].tolist() == [[s + 60, s + 61, s + 62]] * 3  # <|vision_end|> and the text: time max 62 + 1


def test_audio_only_positions():
    block = av_placeholder_ids(TOKENS, n_audio=60)
    pos = mrope_position_ids([5] + block + [6], TOKENS, audio_lengths=[60])
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[:, 2:62].tolist() == [list(range(2, 62)), list(range(2, 62)), [2] * 60]  # (k, k, 0)
    assert pos[:, 62:].tolist() == [[62, 63]] * 3


def tiny_mrope_qwen2(seed=0):
    from model import Qwen2, Qwen2Config
    torch.manual_seed(seed)
    return Qwen2(Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, rope_theta=1e4, mrope_section=(2, 3, 3))).eval()


def test_kv_cache_decode_equals_full_forward_with_mrope():
    """Three unequal rows (a video block's positions) in the prompt, then text: a prefill and one-token decode
    steps over the cache give the full forward's logits."""
    m = tiny_mrope_qwen2()
    idx = torch.randint(0, 97, (2, 18))
    pos = torch.stack([torch.randint(0, 30, (2, 18)) for _ in range(3)]).sort(-1).values  # (3, B, T)
    with torch.no_grad():
        full, _ = m(idx, position_ids=pos)
        logits, cache = m(idx[:, :11], position_ids=pos[:, :, :11], use_cache=True)
        steps = [logits]
        for t in range(11, 18):
            logits, cache = m(idx[:, t:t + 1], cache=cache, use_cache=True, position_ids=pos[:, :, t:t + 1])
            steps.append(logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    with torch.no_grad():  # and the positions really matter
        assert (m(idx, position_ids=pos.flip(0))[0] - full).abs().max() > 1e-3


def test_generate_with_mrope_prompt_matches_greedy_full_forward():
    """generate(position_ids=...) continues the text positions from the prompt's last: equal to greedy decoding
    by full forwards whose new tokens sit at last + 1, last + 2, ... on all three rows."""
    m = tiny_mrope_qwen2(1)
    prompt = torch.randint(0, 97, (1, 9))
    pos = torch.tensor([[0, 1, 2, 2, 2, 4, 4, 7, 8], [0, 1, 2, 2, 3, 2, 3, 7, 8], [0, 1, 2, 3, 2, 3, 2, 7, 8]])[:, None]
    seqs = m.generate(m.embed_tokens(prompt), n=2, max_new_tokens=5, greedy=True, position_ids=pos)
    assert seqs[0] == seqs[1] and len(seqs[0]) == 5
    idx, p = prompt, pos
    with torch.no_grad():
        for _ in range(5):
            nxt = m(idx, position_ids=p)[0][:, -1].argmax(-1, keepdim=True)
            idx, p = torch.cat([idx, nxt], 1), torch.cat([p, p[:, :, -1:] + 1], 2)
    assert idx[0, 9:].tolist() == seqs[0]
