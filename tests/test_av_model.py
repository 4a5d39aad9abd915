"""The assembled audio-visual model: token counts, Eq. 4-6 interleaving, the released checkpoint
layout, the LLaVA-OneVision + Whisper base, and caption.py."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from safetensors.torch import load_file, save_file

from conftest import make_tokenizer, run_cli
import checkpoint
import model
from checkpoint import ours_to_released
from encoders import SiglipVisionConfig, WhisperConfig
from model import AVConfig, Qwen2Config, VideoSALMONN2
from qformer import QFormerConfig
from test_loaders import to_lmms_lab
from test_media import write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(frames_per_segment=100, segment_seconds=2.0, grid=4, time_aligned=False, vocab=300):
    """Every component shaped as in the 7B model, tiny; 100 Whisper frames = 2 s segments by default."""
    D = 64
    return AVConfig(
        llm=Qwen2Config(vocab_size=vocab, hidden_size=D, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6),
        vision=SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=grid * 2, patch_size=2),
        whisper=WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                              encoder_ffn_dim=48, max_source_positions=frames_per_segment),
        qformer=QFormerConfig(encoder_width=32, hidden=32, heads=2, intermediate=48, window=25,
                              frames_per_segment=frames_per_segment, llm_dim=D),
        segment_seconds=segment_seconds, time_aligned=time_aligned)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return VideoSALMONN2(tiny_config(**kw)).eval()


def test_visual_tokens_per_frame_follow_the_config():
    m = tiny_model(grid=27)  # so400m at 384 px has a 27 x 27 patch grid
    assert m.cfg.tokens_per_frame == 13 * 13 + 13 == 182
    feats = torch.randn(3, 27 * 27, 32)
    vis = m.visual_tokens(feats)
    assert vis.shape == (3, 182, 64)
    proj = m.projector(feats).view(3, 27, 27, 64)
    for r in (0, 12):  # each row: 13 max-pooled tokens (the 27th patch column is dropped), then the newline
        row = vis[:, r * 14:(r + 1) * 14]
        pooled = proj[:, 2 * r:2 * r + 2, :26].reshape(3, 2, 13, 2, 64).amax(dim=(1, 3))
        assert torch.allclose(row[:, :13], pooled) and torch.equal(row[:, 13], m.image_newline.expand(3, 64))


@pytest.mark.parametrize("seconds,segments,paper,aligned", [(30, 1, 60, 60), (45, 2, 120, 90), (10, 1, 60, 20)])
def test_audio_token_counts(seconds, segments, paper, aligned):
    """60 tokens per 30 s segment; the paper's mapping spreads them all (padding included) over the
    frames, the time-aligned one keeps 2 per second of real audio."""
    feats = torch.randn(segments, 1500, 32)
    vis = torch.randn(seconds, 6, 64)  # one frame a second
    times = [float(t) for t in range(seconds)]
    for time_aligned, expected in ((False, paper), (True, aligned)):
        m = tiny_model(frames_per_segment=1500, segment_seconds=30.0, time_aligned=time_aligned)
        aud = m.audio(feats)
        assert aud.shape == (paper, 64)
        block = m.interleave(vis, aud, times, float(seconds))
        stretched = -(-expected // seconds) * seconds if not time_aligned else expected  # up to a multiple of n
        assert block.shape == (seconds * 6 + stretched, 64)


@pytest.mark.parametrize("time_aligned", [False, True])
@pytest.mark.parametrize("frames,segments,duration", [(110, 2, 60.0), (7, 1, 7.3), (3, 2, 45.0), (0, 1, 5.0), (4, 0, 4.0)])
def test_av_length_equals_the_interleaved_block(time_aligned, frames, segments, duration):
    """The length train_sft counts tokens (and MFU) with is that of the block the model builds."""
    m = tiny_model(frames_per_segment=1500, segment_seconds=30.0, time_aligned=time_aligned)
    vis = torch.randn(frames, 16, 32) if frames else None
    aud = torch.randn(segments, 1500, 32) if segments else None
    block = m.av_tokens(vis, aud, [float(t) * duration / max(1, frames) for t in range(frames)], duration)
    n_audio = segments * m.cfg.qformer.tokens_per_segment
    assert m.av_length(frames, n_audio, duration) == block.size(0)


def test_interleave_order_paper_mapping():
    m = tiny_model()
    vis = torch.randn(45, 6, 64)
    aud = torch.randn(120, 64)
    block = m.interleave(vis, aud, [float(t) for t in range(45)], 45.0).view(45, 9, 64)
    near = F.interpolate(aud.T[None], size=135, mode="nearest")[0].T  # 120 tokens stretched to 3 per frame
    for i in (0, 17, 44):
        assert torch.equal(block[i, :6], vis[i]) and torch.equal(block[i, 6:], near[3 * i:3 * i + 3])


def test_interleave_order_time_aligned():
    m = tiny_model(time_aligned=True)  # 2 tokens per second
    vis, aud = torch.randn(5, 6, 64), torch.randn(12, 64)  # 5 s of video, 6 s of tokens (segment padding)
    block = m.interleave(vis, aud, [0.0, 1.0, 2.0, 3.0, 4.0], 4.6)
    expected = torch.cat([torch.cat([vis[i], aud[2 * i:min(2 * i + 2, 10)]]) for i in range(5)])
    assert torch.equal(block, expected)  # ceil(4.6 * 2) = 10 tokens kept, the last 2 are padding


def test_mappings_agree_on_whole_segments():
    vis, aud = torch.randn(4, 6, 64), torch.randn(8, 64)  # 4 s of frames, two 2 s segments
    times = [0.0, 1.0, 2.0, 3.0]
    paper = tiny_model().interleave(vis, aud, times, 4.0)
    assert torch.equal(paper, tiny_model(time_aligned=True).interleave(vis, aud, times, 4.0))


RELEASED_KEYS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias", "model.norm.weight", "lm_head.weight",
                 "model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.image_newline",
                 "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight",
                 "speech_encoder.conv1.weight", "speech_encoder.layers.0.self_attn.k_proj.weight", "ln_speech.weight",
                 "speech_Qformer.bert.encoder.layer.1.crossattention.self.key.weight", "speech_query_tokens",
                 "speech_llama_proj.weight", "final_linear.2.weight"]


def outputs(m, seed=1):
    torch.manual_seed(seed)
    feats = (torch.randn(3, 16, 32), torch.randn(2, 100, 32), [0.0, 1.0, 2.0], 3.0)
    with torch.no_grad():
        av = m.av_tokens(*feats)
        return av, m.llm(embeds=m.prompt_embeds([1, 2, 3], av, [4, 5]))[0]


def test_save_and_load_in_released_layout(tmp_path):
    m = tiny_model()
    m.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert set(RELEASED_KEYS) <= keys
    loaded = VideoSALMONN2.from_pretrained(tmp_path)
    for a, b in zip(outputs(m), outputs(loaded.eval())):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in loaded.tower.parameters())
    assert not any(p.requires_grad for p in loaded.speech_encoder.parameters())


def test_released_checkpoint_layout(tmp_path, monkeypatch):
    """A checkpoint as released: a flat Qwen2 config, the encoders' sizes implied, a tower export that
    still carries post-layernorm and a last layer that LLaVA never runs."""
    cfg = tiny_config(frames_per_segment=1500)
    cfg.vision.num_hidden_layers, cfg.vision.keep_layers = 3, 2
    monkeypatch.setattr(checkpoint, "SIGLIP_SO400M", {k: v for k, v in vars(cfg.vision).items() if k != "keep_layers"})
    monkeypatch.setattr(checkpoint, "WHISPER_LARGE_V3", vars(cfg.whisper))
    cfg.qformer = QFormerConfig(encoder_width=32, llm_dim=64)  # the released Q-Former's sizes
    torch.manual_seed(0)
    src = VideoSALMONN2(cfg).eval()
    state = {ours_to_released(k): v.contiguous() for k, v in src.state_dict().items()}
    tower = "model.vision_tower.vision_tower.vision_model."
    state[tower + "post_layernorm.weight"] = torch.ones(32)
    state[tower + "encoder.layers.2.mlp.fc1.weight"] = torch.ones(48, 32)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**vars(cfg.llm), "model_type": "video_salmonn_2",
                                                      "mm_vision_tower": "google/siglip-so400m-patch14-384"}))
    loaded = VideoSALMONN2.from_pretrained(tmp_path).eval()
    assert len(loaded.tower.encoder.layers) == 2 and loaded.cfg.qformer.tokens_per_segment == 60
    feats = (torch.randn(3, 16, 32), torch.randn(1, 1500, 32), [0.0, 1.0, 2.0], 3.0)
    with torch.no_grad():
        assert torch.equal(src.av_tokens(*feats), loaded.av_tokens(*feats))


@pytest.mark.parametrize("layout", ["llava-hf", "lmms-lab"])
def test_base_from_llava_onevision_and_whisper(tmp_path, monkeypatch, layout):
    torch.manual_seed(0)
    text = dict(model_type="qwen2", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14)
    llava = hf.LlavaOnevisionForConditionalGeneration(hf.LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=5, video_token_index=6)).eval()
    llava.save_pretrained(tmp_path / "llava")
    if layout == "lmms-lab":  # the original files: a flat Qwen2 config, the SigLIP tower named by mm_vision_tower
        monkeypatch.setattr(checkpoint, "SIGLIP_SO400M", {k: v for k, v in vision.items() if k != "model_type"})
        save_file(to_lmms_lab(load_file(str(tmp_path / "llava" / "model.safetensors"))), str(tmp_path / "llava" / "model.safetensors"))
        (tmp_path / "llava" / "config.json").write_text(json.dumps(
            {**text, "model_type": "llava", "mm_vision_tower": "google/siglip-so400m-patch14-384"}))
    hf.WhisperModel(hf.WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                     encoder_ffn_dim=48, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32,
                                     vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=3)).save_pretrained(tmp_path / "whisper")
    m = VideoSALMONN2.from_base(tmp_path / "llava", tmp_path / "whisper").eval()
    assert m.cfg.qformer.encoder_width == 32 and m.cfg.qformer.llm_dim == 64
    assert torch.equal(m.projector[0].weight, llava.model.multi_modal_projector.linear_1.weight)
    assert torch.equal(m.image_newline, llava.model.image_newline)
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert torch.allclose(m.llm(idx)[0], llava.lm_head(llava.model.language_model(idx).last_hidden_state), atol=1e-5)
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"llm", "projector", "image_newline", "audio"}  # encoders frozen; stages freeze more
    assert not any(p.is_meta for p in m.parameters())


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model().save_pretrained(path)
    make_tokenizer(path / "tokenizer.json")
    return path


def run_caption(*args):
    return run_cli("caption.py", *args)


def naive_greedy(m, feats, prompt_ids, max_new_tokens, stop_id):
    """Greedy decoding the slow, obvious way, independent of generate and its KV cache: the whole sequence (prompt,
    audio-visual block, the tokens so far) through model.llm at every step, argmax of the last position, until
    stop_id (kept) or max_new_tokens."""
    ids = []
    with torch.no_grad():
        prefix = m.prompt_embeds(prompt_ids[0], m.av_tokens(*feats), prompt_ids[1])  # (1, P, D)
        for _ in range(max_new_tokens):
            tail = m.llm.embed_tokens(torch.tensor([ids], dtype=torch.long))  # (1, len(ids), D)
            ids.append(m.llm(embeds=torch.cat([prefix, tail], dim=1))[0][0, -1].argmax().item())
            if ids[-1] == stop_id:
                break
    return ids


def test_caption_cli_greedy_equals_naive_greedy(tiny_checkpoint, tmp_path):
    video = write_video(tmp_path / "v.mp4", 3)
    out = run_caption(f"--ckpt={tiny_checkpoint}", f"--video={video}", "--greedy", "--max_new_tokens=6")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == caption_alone(tiny_checkpoint, video, 6)  # one video, no --out: the caption alone


def caption_alone(ckpt, video, max_new_tokens):
    """The naive greedy caption of one video, with the prompt caption.py asks without --prompt."""
    from data import encode_prompt, load_tokenizer, load_video
    m, tok = VideoSALMONN2.from_pretrained(ckpt).eval(), load_tokenizer(str(ckpt))
    media = load_video(video, image_size=8, n_mels=80, segment_seconds=2.0)
    prompt = checkpoint.DEMO_PROMPT  # no --prompt, and the checkpoint says none: the released demo prompt
    ids = naive_greedy(m, (*m.encode(media.frames, media.mel), media.times, media.duration), encode_prompt(tok, prompt),
                       max_new_tokens, tok.token_to_id("<|im_end|>"))
    assert len(ids) >= 1
    return tok.decode(ids, skip_special_tokens=True).strip()


@pytest.mark.parametrize("content", [None, b"", b"\x00garbage" * 100])
def test_caption_cli_bad_video_exits_2_naming_it(tiny_checkpoint, tmp_path, content):
    video = tmp_path / "bad.mp4"
    if content is not None:
        video.write_bytes(content)
    out = run_caption(f"--ckpt={tiny_checkpoint}", f"--video={video}")
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "bad.mp4" in out.stderr


def test_caption_cli_folder_skips_unreadable_and_resumes(tiny_checkpoint, tmp_path):
    """A folder: one JSON line per readable video, each the video's caption alone; the unreadable one named once on
    stderr; a second run after a crash (a line lost, the last one torn) captions only what is missing."""
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    videos = [write_video(folder / "a.mp4", 2), write_video(folder / "sub" / "b.mkv", 3, tone=None), write_video(folder / "c.mp4", 4)]
    (folder / "broken.mp4").write_bytes(b"\x00garbage" * 100)
    (folder / "notes.txt").write_text("not a video")
    out_file = tmp_path / "captions.jsonl"
    args = (f"--ckpt={tiny_checkpoint}", f"--video={folder}", f"--out={out_file}", "--greedy", "--max_new_tokens=5", "--batch=2")
    first = run_caption(*args)
    assert first.returncode == 2, first.stderr
    assert [x for x in first.stderr.splitlines() if "error" in x] == [x for x in first.stderr.splitlines() if "broken.mp4" in x]
    assert len([x for x in first.stderr.splitlines() if "broken.mp4" in x]) == 1
    rows = {r["video"]: r for r in map(json.loads, out_file.read_text().splitlines())}
    assert sorted(rows) == sorted(map(str, videos)) and all(r["seconds"] > 0 for r in rows.values())
    assert rows[str(videos[1])]["caption"] == caption_alone(tiny_checkpoint, videos[1], 5)  # as alone

    kept = [json.dumps(rows[str(v)]) for v in (videos[0], videos[2])]
    out_file.write_text(kept[0] + "\n" + kept[1] + "\n" + '{"video": "' + str(videos[1])[:10])  # b lost, a torn line
    second = run_caption(*args)
    assert second.returncode == 2, second.stderr  # the broken file is tried again, and named again
    again = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [json.dumps(r) for r in again[:2]] == kept  # untouched: not captioned again
    assert len(again) == 3 and again[2]["video"] == str(videos[1]) and again[2]["caption"] == rows[str(videos[1])]["caption"]


def test_length_groups_cut_where_padding_costs_more_than_a_forward():
    short, long = [12, 10, 11, 9], [200, 190, 210, 205]
    groups = model.length_groups(short + long, overhead=160)
    assert groups == [[3, 1, 2, 0], [5, 4, 7, 6]]  # each group by length, shortest first
    assert model.length_groups(short + long, overhead=10 ** 6) == [[3, 1, 2, 0, 5, 4, 7, 6]]  # one forward
    assert model.length_groups([50] * 5, overhead=0) == [[0, 1, 2, 3, 4]]  # equal lengths: nothing to save
    assert sorted(i for g in model.length_groups([7, 300, 40, 41, 1000, 2], 30) for i in g) == list(range(6))


@pytest.mark.parametrize("grouped", [False, True])
def test_response_nll_equals_full_forward_cross_entropy(grouped, monkeypatch):
    """Batched, right-padded, head on response rows only == per-sequence full-logits cross-entropy, in one
    forward or in one per length group."""
    if grouped:
        monkeypatch.setattr(model, "length_groups", lambda lengths, overhead: [[2], [0, 1]])
    m = tiny_model()
    torch.manual_seed(2)
    items = [((torch.randn(2, 16, 32), torch.randn(1, 100, 32), [0.0, 1.0], 2.0), [1, 2, 3, 4, 5, 6]),
             ((None, torch.randn(2, 100, 32), [], 3.1), [9, 8, 7]),  # audio only
             ((torch.randn(3, 16, 32), None, [0.0, 1.0, 2.0], 3.0), [11, 12, 13, 14, 15, 16, 17, 18])]  # visual only
    seqs = [(*m.embed_sequence(f, ([1, 2], [3]), r), r) for f, r in items]
    nll, n = m.response_nll(seqs)
    ref = 0.0
    for e, P, r in seqs:
        logits = m.llm(embeds=e)[0][0]
        ref = ref + F.cross_entropy(logits[P - 1:-1], torch.tensor(r), reduction="sum")
    assert n == 17 and torch.allclose(nll, ref, atol=1e-4)
    m.llm.activation_checkpointing = True
    m.train()
    m.audio.eval()  # no dropout: compare gradients exactly
    nll.backward()
    g = [p.grad.clone() for p in m.projector.parameters()]
    m.zero_grad()
    seqs = [(*m.embed_sequence(f, ([1, 2], [3]), r), r) for f, r in items]  # rebuilt with checkpointing on
    m.response_nll(seqs)[0].backward()
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(g, m.projector.parameters()))


def test_continuation_logps_equal_separate_forwards_with_gradients():
    """The shared-prefix pass (the gDPO step's) equals one full forward per continuation, in the
    summed log-probs and in the gradients that reach the trainable parts."""
    m = tiny_model()
    m.audio.eval()
    torch.manual_seed(3)
    feats = (torch.randn(3, 16, 32), torch.randn(2, 100, 32), [0.0, 1.0, 2.0], 3.0)
    prompt, conts = ([1, 2, 3], [4, 5]), [[7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18]]
    logps, lengths = m.continuation_logps(feats, prompt, conts)
    (logps * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    shared = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    ref = []
    for c in conts:
        e, P = m.embed_sequence(feats, prompt, c)
        logits = m.llm(embeds=e)[0][0, P - 1:-1]
        ref.append(-F.cross_entropy(logits, torch.tensor(c), reduction="sum"))
    ref = torch.stack(ref)
    (ref * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    assert lengths.tolist() == [4, 2, 6] and torch.allclose(logps, ref, atol=1e-4)
    assert shared.keys() == {n for n, p in m.named_parameters() if p.grad is not None}
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert torch.allclose(shared[n], p.grad, atol=1e-5), n


def test_encoder_fingerprint_follows_the_frozen_encoders_only():
    """The feature cache's key changes with any weight of the tower or Whisper, not with the LLM or the aligner."""
    base = tiny_model().encoder_fingerprint()
    assert tiny_model().encoder_fingerprint() == base
    for part in ("tower", "speech_encoder", "llm", "audio"):
        m = tiny_model()
        with torch.no_grad():
            next(getattr(m, part).parameters()).view(-1)[0] += 1e-3
        assert (m.encoder_fingerprint() != base) == (part in ("tower", "speech_encoder")), part
