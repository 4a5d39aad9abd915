"""The training loop: FSDP2 over two processes equals one process, resume equals an uninterrupted
run, every stage runs, and a bad clip is skipped and counted."""
import json
import os
import random
import runpy
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import training
from checkpoint import CheckpointError
from conftest import make_tokenizer, run_cli
from model import VideoSALMONN2
from test_media import write_video, write_wav

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(
    llm=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4),
    whisper=dict(num_mel_bins=80, d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                 max_source_positions=100),
    qformer=dict(encoder_width=16, hidden=16, heads=2, intermediate=32, window=10, frames_per_segment=100, llm_dim=32),
    pool=2, segment_seconds=2.0, time_aligned=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Four short clips, two audio files, manifests and a tokenizer."""
    d = tmp_path_factory.mktemp("world")
    (d / "clips").mkdir()
    lines = []
    for i, (sec, tone) in enumerate([(3, 440.0), (2, 880.0), (4, None), (3, 300.0)]):
        write_video(d / "clips" / f"{i}.mp4", sec, fps=4, size=(32, 32), tone=tone)
        lines.append({"video": f"clips/{i}.mp4", "task": "caption", "prompt": "Describe the video in detail.",
                      "response": ["A red circle appears.", "A tone plays.", "The man says hello.", "A tone plays."][i]})
    (d / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    write_wav(d / "a.wav", 1.5, 440.0)
    write_wav(d / "b.wav", 2.5, 880.0)
    (d / "align.jsonl").write_text("\n".join(json.dumps({"audio": f, "task": "asr", "prompt": "Please transcribe the speech.",
                                                         "response": r}) for f, r in [("a.wav", "hello"), ("b.wav", "a tone")]))
    make_tokenizer(d / "tokenizer.json")
    return d


def write_config(path, world, out, **kw):
    c = dict(init_from="scratch", tokenizer=str(world / "tokenizer.json"), arch=ARCH, lora_r=0,
             trainable=("llm.", "projector.", "image_newline", "audio."), train_data=str(world / "train.jsonl"),
             val_data="", batch_size=2, steps=4, lr=1e-3, warmup_ratio=0.25, out_dir=str(out),
             cache_dir=str(world / "cache"), log_every=1, eval_every=0, ckpt_every=0, seed=7, device="cpu", dtype="float32")
    c.update(kw)
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in c.items()))
    return str(path)


def run(args, nproc=1, timeout=240):
    """A script's command, run in this process (conftest.run_cli), or under torchrun with nproc processes."""
    if nproc == 1:
        out = run_cli(*args)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={port}", *args]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def final_weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def assert_same(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), (k, (a[k].float() - b[k].float()).abs().max())


@pytest.mark.parametrize("group_overhead", [160, 0])  # 0: a forward per length in one process; FSDP ranks take one
def test_two_process_fsdp_equals_one_process(world, tmp_path, group_overhead):
    arch = {**ARCH, "qformer": {**ARCH["qformer"], "dropout": 0.0}}  # each rank draws its own dropout masks
    one = write_config(tmp_path / "one.py", world, tmp_path / "one", batch_size=4, arch=arch, group_overhead=group_overhead)
    two = write_config(tmp_path / "two.py", world, tmp_path / "two", batch_size=2, arch=arch, group_overhead=group_overhead)
    run(["train_sft.py", one])
    run(["train_sft.py", two], nproc=2)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert_same(a, b, atol=1e-5)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], final_weights_at_init(world, tmp_path, arch))


def final_weights_at_init(world, tmp_path, arch):
    cfg = write_config(tmp_path / "zero.py", world, tmp_path / "zero", steps=0, arch=arch)
    run(["train_sft.py", cfg])
    return final_weights(tmp_path / "zero")["model.layers.0.self_attn.q_proj.weight"]


def test_resume_equals_uninterrupted(world, tmp_path):
    """Stopped after the checkpoint at step 3 of 6 and resumed: the same weights as 6 steps in one go,
    with LoRA and the aligner's dropout in play (RNG state and data position are restored)."""
    kw = dict(steps=6, ckpt_every=3, lora_r=4, lora_alpha=8, trainable=("lora_", "audio."))
    full = write_config(tmp_path / "full.py", world, tmp_path / "full", **kw)
    run(["train_sft.py", full])
    part = write_config(tmp_path / "part.py", world, tmp_path / "part", **kw)
    run(["train_sft.py", part, "--stop_at=3"])  # the same run, interrupted after its step-3 checkpoint
    meta = json.loads((tmp_path / "part" / "ckpt" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["cursor"] == 6
    os.replace(tmp_path / "part" / "ckpt", tmp_path / "part" / "ckpt.old")  # as a crash between save_checkpoint's renames
    run(["train_sft.py", part, "--resume"])
    assert_same(final_weights(tmp_path / "full"), final_weights(tmp_path / "part"), atol=1e-6)


def test_a_corrupt_resume_state_is_named(tmp_path):
    """Whatever torch.load meets in a file that is no resume state: a CheckpointError naming the file."""
    torch.save({"optimizer": {}, "rng": {}}, tmp_path / "ok.pt")
    assert training.load_state(tmp_path / "ok.pt") == {"optimizer": {}, "rng": {}}
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")  # torch.load: KeyError
    (tmp_path / "random.pt").write_bytes(random.Random(2).randbytes(3000))  # torch.load: IndexError
    for name, reason in (("other", "not a resume state"), ("text", "cannot be read"), ("random", "cannot be read")):
        with pytest.raises(CheckpointError, match=f"{name}.pt: {reason}"):
            training.load_state(tmp_path / f"{name}.pt")


def test_a_corrupt_meta_json_is_named(tmp_path):
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "meta.json").write_text('{"step": 3')
    with pytest.raises(CheckpointError, match="cut/meta.json: not a JSON object"):
        training.checkpoint_meta(str(tmp_path / "cut"))
    (tmp_path / "typed.old").mkdir()  # a crash between save_checkpoint's renames left it there
    (tmp_path / "typed.old" / "meta.json").write_text(json.dumps({"step": "3", "cursor": 6, "config": {}, "world": 1}))
    with pytest.raises(CheckpointError, match=r"typed.old/meta.json: .*step: '3', not an int"):
        training.checkpoint_meta(str(tmp_path / "typed"))


def test_align_stage_and_bad_clip_is_skipped_and_counted(world, tmp_path):
    base = write_config(tmp_path / "base.py", world, tmp_path / "base", steps=2, use_audio=False)
    run(["train_sft.py", base])
    manifest = tmp_path / "with_bad.jsonl"
    (tmp_path / "bad.mp4").write_bytes(b"\x00not a video" * 50)
    lines = (world / "train.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines] + [{"video": str(tmp_path / "bad.mp4"), "prompt": "Describe.", "response": "x"}]
    for r in rows[:-1]:
        r["video"] = str(world / r["video"])
    rows.append({"video": rows[0]["video"], "prompt": "Describe."})  # no response: nothing to train on
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    sft = write_config(tmp_path / "sft.py", world, tmp_path / "sft", init_from=str(tmp_path / "base" / "final"),
                       tokenizer="", train_data=str(manifest), steps=2, lora_r=4, lora_alpha=8, trainable=("lora_", "audio."),
                       time_aligned=True)
    out = run(["train_sft.py", sft])
    assert "4 items (2 skipped)" in out.stdout and "bad.mp4" in out.stdout
    assert f"{manifest}:6): no response to train on" in out.stdout
    assert VideoSALMONN2.from_pretrained(tmp_path / "sft" / "final").cfg.time_aligned  # set by the script, kept in the export
    align = write_config(tmp_path / "align.py", world, tmp_path / "align", init_from=str(tmp_path / "sft" / "final"),
                         tokenizer="", train_data=str(world / "align.jsonl"), tasks=("asr",), trainable=("audio.",), steps=2)
    run(["train_align.py", align])
    before, after = final_weights(tmp_path / "sft"), final_weights(tmp_path / "align")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("speech_Qformer.", "speech_query_tokens", "ln_speech.", "speech_llama_proj.",
                                         "final_linear.")) for k in changed)  # only the aligner trained
    log = [json.loads(x) for x in (tmp_path / "align" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all({"loss", "lr", "tok/s"} <= r.keys() for r in log)
    # caption.py's default prompt: the most common caption prompt of what trained, kept by a stage without captions
    saved = [json.loads((tmp_path / s / "final" / "train_config.json").read_text())["caption_prompt"] for s in ("sft", "align")]
    assert saved == ["Describe the video in detail."] * 2


def small_toy_vision(tmp_path):
    """The small toy world, encoders of the toy's arch standing in for pretrain_encoders.py's, and the vision stage
    (config/toy_vision.py) trained 2 steps on them: (world dir, encoder state, the stages' common arguments)."""
    from encoders import SiglipVision, SiglipVisionConfig, WhisperConfig, WhisperEncoder
    from safetensors.torch import save_file
    d = tmp_path / "toyav"
    run(["data/toyav/prepare.py", "--small", "--out", str(d)])
    arch = runpy.run_path(os.path.join(ROOT, "config", "toy_vision.py"))["arch"]
    torch.manual_seed(3)  # encoders unlike any scratch model's
    tower, whisper = SiglipVision(SiglipVisionConfig(**arch["vision"])), WhisperEncoder(WhisperConfig(**arch["whisper"]))
    encoders = {**{f"tower.{k}": v for k, v in tower.state_dict().items()},
                **{f"speech_encoder.{k}": v for k, v in whisper.state_dict().items()}}
    save_file(encoders, str(tmp_path / "encoders.safetensors"))
    common = [f"--cache_dir={tmp_path / 'cache'}", "--steps=2", "--batch_size=2", "--val_data="]
    run(["train_sft.py", "config/toy_vision.py", *common, f"--tokenizer={d / 'tokenizer.json'}",
         f"--encoders={tmp_path / 'encoders.safetensors'}", f"--train_data={d / 'base_train.jsonl'}",
         f"--out_dir={tmp_path / 'vision'}"])
    return d, encoders, common


def test_toy_stages_and_results_json(tmp_path):
    """The make toy chain on the small toy world, a few steps each: copy -> the base that reads its written soundtrack
    -> alignment anchored to speech and sounds, its tokens snapped -> SFT of the LoRA alone; each evaluation lands in
    results.json under the keys that external checks read (the base's with its earlier stages' seconds). The scratch
    stage (the vision stage) loads the pretrained encoders, which no later stage changes."""
    d, encoders, common = small_toy_vision(tmp_path)
    res = tmp_path / "results.json"
    run(["train_sft.py", "config/toy_copy.py", *common, f"--init_from={tmp_path / 'vision' / 'final'}",
         f"--train_data={d / 'copy_train.jsonl'}", f"--out_dir={tmp_path / 'copy'}"])  # evaluated by no toy stage
    stages = [("train_sft.py", "config/toy_base.py", "base", f"--init_from={tmp_path / 'copy' / 'final'}",
               f"--train_data={d / 'written_train.jsonl'},{d / 'base_train.jsonl'},{d / 'align_train.jsonl'}"),
              ("train_align.py", "config/toy_align.py", "align", f"--init_from={tmp_path / 'base' / 'final'}",
               f"--train_data={d / 'align_train.jsonl'}"),
              ("train_sft.py", "config/toy_sft.py", "sft", f"--init_from={tmp_path / 'align' / 'final'}",
               f"--train_data={d / 'train.jsonl'}")]
    for script, cfg, stage, *args in stages:
        run([script, cfg, *common, *args, f"--out_dir={tmp_path / stage}"])
        run(["eval.py", f"--stage={stage}", f"--ckpt={tmp_path / stage / 'final'}", f"--data_dir={d}", f"--results={res}",
             f"--cache_dir={tmp_path / 'cache'}", "--limit=2", "--max_new_tokens=8"])
    written = tmp_path / "written.json"  # the base given each item's written soundtrack
    run(["eval.py", "--stage=align", f"--ckpt={tmp_path / 'base' / 'final'}", f"--data_dir={d}", f"--results={written}",
         f"--cache_dir={tmp_path / 'cache'}", "--limit=2", "--max_new_tokens=8", "--written_audio=True"])
    assert "asr_wer" in json.loads(written.read_text())["align"]
    r = json.loads(res.read_text())
    assert set(r["seconds"]) == {"prepare", "vision", "copy", "base", "align", "sft"} and all(v > 0 for v in r["seconds"].values())
    assert {"total", "miss", "hall"} <= set(r["base"]) and "asr_wer" in r["align"]
    assert {"miss", "hall", "total", "qa_acc", "accuracy"} <= set(r["sft"]) and 0 <= r["sft"]["qa_acc"] <= 1
    assert set(r["sft"]["accuracy"]) <= {"visual", "sound", "speech"}
    base = json.loads((tmp_path / "base" / "final" / "train_config.json").read_text())
    align = json.loads((tmp_path / "align" / "final" / "train_config.json").read_text())
    assert base["written_audio"] is True and align["anchor_sounds"] is True and align["anchor"] == 1.0
    aligned, sft = (VideoSALMONN2.from_pretrained(tmp_path / s / "final") for s in ("align", "sft"))
    assert all(m.cfg.time_aligned and m.cfg.snap_audio for m in (aligned, sft))  # saved with the config, kept by SFT
    assert all(torch.equal(p, sft.audio.state_dict()[k]) for k, p in aligned.audio.state_dict().items())  # LoRA only
    for stage in ("vision", "copy", "base", "align", "sft"):  # the encoders are frozen from the vision stage on
        m = VideoSALMONN2.from_pretrained(tmp_path / stage / "final")
        state = {f"tower.{k}": v for k, v in m.tower.state_dict().items()}
        state.update({f"speech_encoder.{k}": v for k, v in m.speech_encoder.state_dict().items()})
        assert state.keys() == encoders.keys()
        assert all(torch.equal(state[k], encoders[k].to(state[k].dtype)) for k in encoders), stage


def test_non_finite_losses_are_skipped_then_stop_the_run(world, tmp_path):
    """An absurd learning rate sends the weights to inf: every later step is skipped and logged, and
    max_bad_steps of them in a row end the run with a clear message instead of training on garbage."""
    cfg = write_config(tmp_path / "nan.py", world, tmp_path / "nan", steps=20, lr=1e30, warmup_ratio=0.0, grad_clip=0.0,
                       max_bad_steps=3)
    out = run_cli("train_sft.py", cfg)
    assert out.returncode != 0
    assert "3 non-finite losses in a row" in out.stderr + out.stdout
    assert (out.stdout + out.stderr).count("non-finite loss, step skipped") == 3


@pytest.mark.parametrize("trainable", [("lora_",), ("llm.",)])
def test_estimate_flops_equals_the_flops_counted_in_a_step(trainable):
    """The MFU numerator: FLOPs of one forward and backward of the LLM, counted by torch's FlopCounterMode, equal
    model.estimate_flops, attention left out (the counter does not see the CPU attention kernel)."""
    from torch.utils.flop_counter import FlopCounterMode
    import lora
    from test_av_model import tiny_model
    m = tiny_model()
    lora.apply_lora(m.llm, r=4, alpha=8, dropout=0.0)
    for name, p in m.named_parameters():
        p.requires_grad_(any(t in name for t in trainable))
    m.llm.train()
    # equal lengths (no padding); the inputs need gradients, as an AV block from a trained projector and aligner does
    seqs = [(torch.randn(1, 9, 64, requires_grad=True), 5, [1, 2, 3, 4]), (torch.randn(1, 9, 64, requires_grad=True), 6, [5, 6, 7])]
    with FlopCounterMode(display=False) as counter:
        m.response_nll(seqs)[0].backward()
    attention = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "attention" in str(op))
    cfg = m.cfg.llm
    no_attention = m.estimate_flops([(9, 4), (9, 3)]) - 6 * cfg.num_hidden_layers * cfg.hidden_size * 2 * 9 * 9
    assert counter.get_total_flops() - attention == no_attention
