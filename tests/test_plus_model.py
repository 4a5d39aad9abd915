"""video-SALMONN 2+ (model_plus.py) against transformers' Qwen2_5_VLForConditionalGeneration on video-only
inputs, the base built as gen_audio_model.py does, the authors' full layout, and KV-cache decode with M-RoPE."""
import json

import pytest
import torch
import transformers as hf

from model import av_placeholder_ids
from model_plus import VideoSALMONN2Plus

V = 300
TOKENS = dict(vision_start_token_id=288, vision_end_token_id=289, video_token_id=290, image_token_id=291)
AUDIO_ID = 292
TEXT = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]))
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, window_size=56,
              fullatt_block_indexes=[1], tokens_per_second=2)
WHISPER = dict(num_mel_bins=8, d_model=48, encoder_layers=2, encoder_attention_heads=4, decoder_layers=1,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=50,
               max_target_positions=20, vocab_size=50, pad_token_id=1, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
# a small Q-Former (the authors' default is 3072 wide), 5-frame windows: 10 audio tokens per 50-frame chunk
AUDIO = dict(second_per_window=3.0, second_stride=3.0, qformer_config=dict(
    hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=2, query_length=1))


def randomise(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():  # biases zero and norms one at init: make every parameter matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.normal_(std=0.1).add_(1.0 if ("norm" in name or "ln_q" in name) and name.endswith("weight") else 0.0)
    return model


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plus")
    torch.manual_seed(0)
    ref = hf.Qwen2_5_VLForConditionalGeneration(hf.Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION, **TOKENS)).eval()
    randomise(ref, 0).save_pretrained(root / "qwen_vl")
    raw = json.loads((root / "qwen_vl" / "config.json").read_text())
    (root / "qwen_vl" / "config.json").write_text(json.dumps({**raw, "audio_token_id": 292}))
    torch.manual_seed(1)
    hf.WhisperForConditionalGeneration(hf.WhisperConfig(**WHISPER)).save_pretrained(root / "whisper")
    return ref, root


def video_prompt(grid, seconds, before=(5, 6, 7), after=(8, 9, 10, 11)):
    return list(before) + av_placeholder_ids({**TOKENS, "audio_token_id": AUDIO_ID}, grid) + list(after)


# grids whose video time positions stay below max(h, w) / 2, where transformers >= 5.3 agrees with the
# authors' position rule for the text after the video (tests/test_mrope.py compares the rules themselves)
@pytest.mark.parametrize("grids,seconds", [([(2, 4, 6)], [1.0]), ([(1, 6, 10)], [0.5]), ([(4, 8, 8), (2, 4, 6)], [0.4, 1.0])],
                         ids=["two-grids", "one-frame-wide", "batch-of-two"])
def test_video_logits_match_transformers(base_dirs, grids, seconds):
    ref, root = base_dirs
    ours = VideoSALMONN2Plus.from_base(root / "qwen_vl", root / "whisper", AUDIO).eval()
    rows = [video_prompt(g, s) for g, s in zip(grids, seconds)]
    grid_thw = torch.tensor(grids)
    px = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 14 * 14)
    with torch.no_grad():
        for i, (row, g, s) in enumerate(zip(rows, grids, seconds)):  # transformers one video per row here
            n = int(torch.tensor(g).prod())
            off = int(grid_thw[:i].prod(-1).sum()) if i else 0
            ids = torch.tensor([row])
            mm = (ids == TOKENS["video_token_id"]).int() * 2
            expected = ref(input_ids=ids, pixel_values_videos=px[off:off + n], video_grid_thw=torch.tensor([g]),
                           second_per_grid_ts=torch.tensor([s]), mm_token_type_ids=mm).logits
            got = ours.logits(input_ids=ids, pixel_values_videos=px[off:off + n], video_grid_thw=torch.tensor([g]),
                              second_per_grid_ts=torch.tensor([s]))
            assert got.shape == (1, len(row), V)
            assert (got - expected).abs().max().item() <= 1e-4


def test_base_is_gen_audio_model(base_dirs):
    """gen_audio_model.py: Whisper's encoder weights in audio.*, a fresh Q-Former, <|audio_pad|> from config.json."""
    _, root = base_dirs
    ours = VideoSALMONN2Plus.from_base(root / "qwen_vl", root / "whisper", AUDIO)
    whisper = hf.WhisperForConditionalGeneration.from_pretrained(root / "whisper").model.encoder.state_dict()
    for k, v in whisper.items():
        assert torch.equal(ours.audio.state_dict()[k], v), k
    assert ours.cfg.tokens["audio_token_id"] == 292
    assert abs(ours.audio.q_tokens.std().item() - 0.02) < 0.02 and not ours.audio.audio_proj.bias.any()
    trainable = {n.split(".")[1] for n, p in ours.named_parameters() if p.requires_grad and n.startswith(("visual.", "audio."))}
    assert trainable == {"merger", "qformer", "q_tokens", "audio_proj"}


def authors_checkpoint(ours, path):
    """A full 2+ checkpoint as the authors' save_pretrained writes it: flat LLM config (transformers 4.51),
    audio_config with its qformer_config, the Q-Former's position_ids buffer."""
    from checkpoint import save_safetensors
    state = {("model." + k[4:] if not k.startswith("llm.lm_head") else k[4:]): v for k, v in ours.state_dict().items() if k.startswith("llm.")}
    state.update({k: v for k, v in ours.state_dict().items() if k.startswith(("visual.", "audio."))})
    state["audio.qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    save_safetensors(state, path)
    c = ours.cfg
    q = c.qformer
    cfg = {**{k: v for k, v in vars(c.llm).items()}, "rope_scaling": {"type": "mrope", "mrope_section": list(c.llm.mrope_section)},
           "vision_config": {**vars(c.vision), "fullatt_block_indexes": list(c.vision.fullatt_block_indexes)},
           "audio_config": {**vars(c.whisper), "second_per_window": 3.0, "second_stride": 3.0,
                            "qformer_config": dict(hidden_size=q.hidden, num_attention_heads=q.heads, intermediate_size=q.intermediate,
                                                   num_hidden_layers=q.layers, query_length=q.num_query, encoder_width=q.encoder_width,
                                                   out_hidden_size=q.llm_dim)},
           **c.tokens, "model_type": "qwen2_5_vl"}
    (path / "config.json").write_text(json.dumps(cfg))


def test_authors_layout_round_trip_with_audio(base_dirs, tmp_path):
    """A full checkpoint in the authors' layout loads (buffers ignored by name) and gives the same logits on an
    audio-visual prompt: 2 grids, 1 s each, one 30 s chunk of audio (10 tokens with this tiny Q-Former)."""
    _, root = base_dirs
    ours = VideoSALMONN2Plus.from_base(root / "qwen_vl", root / "whisper", AUDIO).eval()
    randomise(ours.audio, 3)
    with torch.no_grad():
        for p in ours.audio.qformer.parameters():  # the windows' frames, not the query, dominate the tokens
            p.normal_(std=0.3)
        ours.audio.audio_proj.weight.normal_(std=1.0)  # audio tokens as large as text embeddings
    authors_checkpoint(ours, tmp_path)
    loaded = VideoSALMONN2Plus.from_pretrained(tmp_path).eval()
    tokens = ours.cfg.tokens
    n_audio = ours.cfg.qformer.tokens_per_segment
    ids = torch.tensor([[5, 6] + av_placeholder_ids(tokens, (2, 4, 4), 1.0, n_audio) + [8, 9]])
    kw = dict(pixel_values_videos=torch.randn(32, 1176), video_grid_thw=torch.tensor([[2, 4, 4]]),
              second_per_grid_ts=torch.tensor([1.0]), audio_feature=torch.randn(1, 8, 100), audio_lengths=[n_audio])
    with torch.no_grad():
        a, b = ours.logits(input_ids=ids, **kw), loaded.logits(input_ids=ids, **kw)
        silent = ours.logits(input_ids=ids, **{**kw, "audio_feature": torch.zeros(1, 8, 100)})
    assert torch.equal(a, b)
    assert (a - silent).abs().max() > 1e-3  # the audio reaches the logits


def test_kv_cache_decode_equals_full_forward(base_dirs):
    _, root = base_dirs
    m = VideoSALMONN2Plus.from_base(root / "qwen_vl", root / "whisper", AUDIO).eval()
    grid = (2, 4, 6)
    ids = torch.tensor([video_prompt(grid, 1.0) + [12, 13, 14, 15]])
    px = torch.randn(48, 1176)
    with torch.no_grad():
        x = m.embed(ids, px, torch.tensor([grid]))
        pos = m.position_ids(ids, torch.tensor([grid]), [1.0])
        full, _ = m.hidden(x, pos)
        P = ids.size(1) - 4
        h, cache = m.hidden(x[:, :P], pos[:, :, :P], use_cache=True)
        steps = [h]
        for t in range(P, ids.size(1)):
            h, cache = m.hidden(x[:, t:t + 1], pos[:, :, t:t + 1], cache=cache, use_cache=True)
            steps.append(h)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert pos[0, 0, P:].tolist() == list(range(int(pos[:, 0, :P].max()) + 1, int(pos[:, 0, :P].max()) + 5))


def test_lora_release_on_its_base(base_dirs, tmp_path):
    """A PEFT LoRA-only release (keys base_model.model.<authors' name>, modules_to_save stored under the
    module's own name) equals the base with W += alpha / r * B A on q/k/v and the saved merger and Q-Former."""
    import copy

    from safetensors.torch import save_file
    _, root = base_dirs
    base = VideoSALMONN2Plus.from_base(root / "qwen_vl", root / "whisper", AUDIO).eval()
    authors_checkpoint(base, tmp_path / "base")
    torch.manual_seed(5)
    r, alpha, adapter, expected = 4, 8, {}, copy.deepcopy(base)
    with torch.no_grad():
        for i, layer in enumerate(expected.llm.layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                lin = getattr(layer.self_attn, proj)
                A, B = torch.randn(r, lin.in_features) * 0.1, torch.randn(lin.out_features, r) * 0.1
                adapter[f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_A.weight"] = A
                adapter[f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_B.weight"] = B
                lin.weight += alpha / r * B @ A
        for name, p in list(expected.visual.merger.named_parameters()) + list(expected.audio.audio_proj.named_parameters()):
            p.normal_(std=0.1)
        for name, p in expected.visual.merger.named_parameters():
            adapter[f"base_model.model.visual.merger.{name}"] = p.clone()
        for name, p in expected.audio.audio_proj.named_parameters():
            adapter[f"base_model.model.audio.audio_proj.{name}"] = p.clone()
    (tmp_path / "lora").mkdir()
    save_file(adapter, tmp_path / "lora" / "adapter_model.safetensors")
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(dict(
        r=r, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj"], peft_type="LORA",
        modules_to_save=["visual.merger", "audio.qformer", "audio.q_tokens", "audio.audio_proj"])))
    loaded = VideoSALMONN2Plus.from_lora(tmp_path / "lora", tmp_path / "base").eval()
    ids = torch.tensor([video_prompt((2, 4, 6), 1.0)])
    kw = dict(pixel_values_videos=torch.randn(48, 1176), video_grid_thw=torch.tensor([[2, 4, 6]]), second_per_grid_ts=[1.0])
    with torch.no_grad():
        got, want, before = loaded.logits(input_ids=ids, **kw), expected.logits(input_ids=ids, **kw), base.logits(input_ids=ids, **kw)
    assert (got - want).abs().max().item() <= 1e-4 and (got - before).abs().max().item() > 1e-2

    from checkpoint import CheckpointError  # a release that does not fit is named, not a load_state_dict size error
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**adapter, key: torch.zeros(r + 1, adapter[key].shape[1])}, tmp_path / "lora" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=f"adapter_model.safetensors: {key} is \\[{r + 1}, "):
        VideoSALMONN2Plus.from_lora(tmp_path / "lora", tmp_path / "base")
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"r": "4", "lora_alpha": alpha}))
    with pytest.raises(CheckpointError, match="adapter_config.json: no integer r"):
        VideoSALMONN2Plus.from_lora(tmp_path / "lora", tmp_path / "base")
    (tmp_path / "lora" / "adapter_config.json").write_text('{"r": 4, "lora_al')  # cut short by a download
    with pytest.raises(CheckpointError, match="adapter_config.json: not a JSON object"):
        VideoSALMONN2Plus.from_lora(tmp_path / "lora", tmp_path / "base")


def test_save_pretrained_round_trip(base_dirs, tmp_path):
    _, root = base_dirs
    m = randomise(VideoSALMONN2Plus.from_base(root / "qwen_vl", root / "whisper", AUDIO).eval(), 7)
    m.save_pretrained(tmp_path, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = VideoSALMONN2Plus.from_pretrained(tmp_path)
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.cfg == m.cfg


def test_export_as_hf_qwen25vl(base_dirs, tmp_path):
    """The LLM and ViT written in the Qwen2.5-VL layout load in transformers and give our video-only logits."""
    from checkpoint import save_hf_qwen25vl
    ref, root = base_dirs
    m = randomise(VideoSALMONN2Plus.from_base(root / "qwen_vl", root / "whisper", AUDIO).eval(), 9)
    save_hf_qwen25vl(m.state_dict(), m.cfg, tmp_path, dtype=torch.float32)
    hf_model = hf.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    grid = (2, 4, 6)
    ids = torch.tensor([video_prompt(grid, 1.0)])
    px = torch.randn(48, 1176)
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, pixel_values_videos=px, video_grid_thw=torch.tensor([grid]),
                          second_per_grid_ts=torch.tensor([1.0]), mm_token_type_ids=(ids == TOKENS["video_token_id"]).int() * 2).logits
        ours = m.logits(input_ids=ids, pixel_values_videos=px, video_grid_thw=torch.tensor([grid]), second_per_grid_ts=[1.0])
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_training_sequences_equal_logits(base_dirs):
    """The training path on cached features (encode, then block, embed_sequence, response_nll,
    continuation_logps) equals the public logits() on the same audio-visual prompt."""
    _, root = base_dirs
    m = randomise(VideoSALMONN2Plus.from_base(root / "qwen_vl", root / "whisper", AUDIO).eval(), 11)
    grid, px, mel = torch.tensor([2, 4, 6]), torch.randn(48, 1176), torch.randn(2, 8, 100)
    with torch.no_grad():
        vis, aud = m.encode(px.view(2, 4, 6, 1176), mel)  # data.load_media's form: the grid in the shape
        feats = (vis, aud, [0.0, 0.5], 1.0)  # each grid's start: 0.5 s per grid
        before, after, response = [5, 6], [7, 8], [20, 21, 22]
        block = m.block(feats)[0]
        ids = torch.tensor([before + block + after + response])
        assert m.sequence_length((feats, (before, after), response)) == (ids.size(1), 3)
        logits = m.logits(input_ids=ids, pixel_values_videos=px, video_grid_thw=grid[None], second_per_grid_ts=[0.5],
                          audio_feature=mel, audio_lengths=[20])
        logp = torch.log_softmax(logits[0], -1)
        P = ids.size(1) - 3
        expected = -sum(logp[P - 1 + j, t] for j, t in enumerate(response))
        nll, n = m([(feats, (before, after), response)])
        assert n == 3 and abs(nll.item() - expected.item()) < 1e-4
        other = [20, 30]
        lps, lengths = m.continuation_logps(feats, (before, after), [response, other])
        ids2 = torch.tensor([before + block + after + other])
        logp2 = torch.log_softmax(m.logits(input_ids=ids2, pixel_values_videos=px, video_grid_thw=grid[None],
                                           second_per_grid_ts=[0.5], audio_feature=mel, audio_lengths=[20])[0], -1)
        assert lengths.tolist() == [3, 2]
        assert abs(lps[0].item() + expected.item()) < 1e-4
        assert abs(lps[1].item() - sum(logp2[P - 1 + j, t] for j, t in enumerate(other)).item()) < 1e-4
