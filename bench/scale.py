"""
The 7B path of video-SALMONN 2 on one GPU, with random weights in the exact shapes (no download): Qwen2-7B,
SigLIP-so400m at 384 px (26 of 27 layers), Whisper-large-v3's encoder and the released Q-Former. One row each:
1. an AV-SFT step (forward, backward, AdamW on what config/vs2_7b_sft.py trains: LoRA on q/k/v, the Q-Former,
   the projector; encoders frozen and fed from cached features), activation checkpointing on and off: tokens/s,
   MFU, peak memory, and the peak that bench/memory_plan.py predicts for it;
2. a gDPO step (train_mrdpo.pair_step: one prefix pass, chosen / rejected / ground truth over its KV cache)
   against the SFT step (goal: at most 1.5x) and against the released 5-pass scheme (goal: 4x faster);
3. caption sampling (2 captions sharing the prefix's KV cache): decode tokens/s, the steps after the prefill timed
   on their own, against the memory-bandwidth bound;
4. the frozen encoders' throughput, and the GPU-hours per epoch that the feature cache saves.
The sequence is the paper's: 110 frames x 182 tokens, 60 s of audio (2 Whisper segments), the chat prompt and an
800-token caption. Rows that may not fit a card (checkpointing off, the 5-pass scheme) print OOM.

video-SALMONN 2+ 7B (--model=vs2plus_7b): Qwen2.5-VL-7B (its LLM and ViT), Whisper-large-v3 and the authors'
3072-wide Q-Former, config/vs2plus_7b_sft.py's trainable set (LoRA, the merger, the Q-Former), and its sequence:
768 frames at 10 fps of a 16:9 video at 61,250 pixels (384 grids x 66 tokens = 25,344) and 76.8 s of audio
(3 chunks, 180 tokens); there is no 5-pass scheme to compare with (its row prints "-"), the encoders are the ViT
(less its merger) and Whisper.

$ python bench/scale.py              # the 7B model; the last line is "sft_mfu: X.XX"
$ python bench/scale.py --layers=8   # fewer LLM layers, for a smaller card
$ python bench/scale.py --smoke      # toy shapes on the CPU, a few seconds
$ python bench/scale.py --model=vs2plus_7b [--smoke]
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
import train_mrdpo  # noqa: E402
import training  # noqa: E402
from config import configure, run  # noqa: E402
from checkpoint import av_config_from_hf, plus_config_from_hf  # noqa: E402
from model import AVConfig, VideoSALMONN2  # noqa: E402
from model_plus import PlusConfig, VideoSALMONN2Plus  # noqa: E402
from train_mrdpo import pair_step  # noqa: E402
from training import PEAK_FLOPS, autocast, step_loss  # noqa: E402
from gdpo_step import five_pass_loss  # noqa: E402
from memory_plan import PLUS, QWEN25_VL, QWEN2_7B, SFT_TRAINABLE, plan  # noqa: E402

# -----------------------------------------------------------------------------
model = "vs2_7b"  # or vs2plus_7b: 2+ (frames and seconds below become its 768 frames and 76.8 s)
layers = 28  # LLM layers (Qwen2-7B: 28); fewer to fit a smaller card
frames = 110  # video frames: 110 x 182 = 20,020 visual tokens, the paper's maximum
seconds = 60  # audio seconds: 2 Whisper segments of 30 s -> 120 audio tokens (stretched over the frames)
caption_tokens = 800  # tokens per caption (SFT response; gDPO chosen, rejected and ground truth)
lora_r = 128  # LoRA rank on q, k, v (alpha = 2r, as released)
samples = 2  # captions sampled per video, sharing the prefix's KV cache (MrDPO's samples_per_video)
sample_tokens = 128  # tokens sampled per caption: the first from the prefill, then a decode step each
epoch_samples = 13000  # SFT videos per epoch: "about 13k videos" (paper 4.2)
repeats = 3  # timed runs of each row after a warm-up; the median is reported
smoke = False  # toy shapes, for the test
device = "cuda" if torch.cuda.is_available() else "cpu"
seed = 1337
# -----------------------------------------------------------------------------
PROMPT_TOKENS = (14, 50)  # chat prompt ids before / after the AV block: Qwen2's template with caption.py's prompt, about
BANDWIDTH = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # HBM bytes/s; most specific first
DPO = {"beta": train_mrdpo.beta, "ce_weight": train_mrdpo.ce_weight}


def tiny_config(n_layer):
    """The smoke test's shapes: every module of the 7B model, a few channels wide."""
    return AVConfig.from_dict(dict(
        llm=dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=n_layer, num_attention_heads=4,
                 num_key_value_heads=1),
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                    patch_size=4),
        whisper=dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
                     max_source_positions=1500),  # 1500 frames: 60 Q-Former windows per segment, as the real one
        qformer=dict(encoder_width=64, hidden=64, heads=2, intermediate=128, llm_dim=64),
        pool=2, segment_seconds=30.0, time_aligned=False))


def tiny_plus_config(n_layer):
    """The 2+ smoke test's shapes: every module of the 2+ 7B model, a few channels wide."""
    return PlusConfig.from_dict(dict(
        llm=dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=n_layer, num_attention_heads=4,
                 num_key_value_heads=1, mrope_section=(2, 3, 3)),
        vision=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, window_size=56,
                    fullatt_block_indexes=(1,)),
        whisper=dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
                     max_source_positions=1500),
        qformer=dict(encoder_width=64, hidden=64, heads=2, intermediate=128, llm_dim=64, final_linear=False),
        tokens=dict(vision_start_token_id=500, vision_end_token_id=501, video_token_id=502, audio_token_id=503)))


def build(c, dev, frozen):
    """The model with its SFT config's trainable set and training.build_model's dtypes (trainable fp32, frozen
    `frozen`), built on the meta device and materialised once on dev, so a 7B model is never held twice, nor in fp32."""
    if c["model"] == "vs2plus_7b":
        cfg = tiny_plus_config(c["layers"]) if c["smoke"] else plus_config_from_hf(dict(QWEN25_VL["7b"], num_hidden_layers=c["layers"]))
        cls, trainable = VideoSALMONN2Plus, PLUS["trainable"]
    else:
        cfg = tiny_config(c["layers"]) if c["smoke"] else av_config_from_hf(dict(QWEN2_7B, num_hidden_layers=c["layers"]))
        cls, trainable = VideoSALMONN2, SFT_TRAINABLE
    with torch.device("meta"):
        model = cls(cfg)
        lora.apply_lora(model.llm, training.lora_targets, c["lora_r"], 2 * c["lora_r"], training.lora_dropout)
        for name, p in model.named_parameters():
            p.requires_grad_(any(t in name for t in trainable))
            p.data = p.data.to(torch.float32 if p.requires_grad else frozen)
    model.to_empty(device=dev)
    with torch.no_grad():  # random weights: matrices N(0, 0.02), norm scales 1, biases 0 (and lora_B != 0: mid-round)
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0 if name.endswith("weight") else 0.0)
    return model


def lookup(table, dev):
    return next((v for k, v in table.items() if dev.type == "cuda" and k in torch.cuda.get_device_name(dev)), None)


def fmt(x, digits):
    """A number with `digits` decimals (two more below 1, so a small rate is not printed as 0), "-" or "OOM"."""
    return x if isinstance(x, str) else "-" if x is None else f"{x:.{digits if abs(x) >= 1 else digits + 2}f}"


def table(rows):
    print(f"{'measurement':<16}{'seconds':>10}{'rate':>11}  {'unit':<12}{'ratio':>7}{'peak_GB':>9}{'plan_GB':>9}  ratio of")
    for name, secs, rate, unit, ratio, peak, planned, note in rows:
        print(f"{name:<16}{fmt(secs, 3):>10}{fmt(rate, 1):>11}  {unit:<12}{fmt(ratio, 2):>7}{fmt(peak, 1):>9}"
              f"{fmt(planned, 1):>9}  {note}".rstrip())


def main(argv):
    c = configure(globals(), argv)
    plus = c["model"] == "vs2plus_7b"
    if plus:
        c.update(frames=PLUS["frames"], seconds=76.8)
    if c["smoke"]:
        c.update(layers=2, frames=4, caption_tokens=16, lora_r=8, sample_tokens=32, repeats=1)
    torch.manual_seed(c["seed"])
    dev = torch.device(c["device"])
    cuda = dev.type == "cuda"
    amp = "bfloat16" if cuda else "float32"  # train_sft's dtype: the frozen weights', which autocast computes in
    model = build(c, dev, getattr(torch, amp))
    cfg = model.cfg
    V = cfg.llm.vocab_size
    if plus:  # data.load_media's 2+ form: (grids, patch rows, patch columns, patch) and 30 s log-mel chunks
        S, grid = -(-int(c["seconds"]) // 30), (-(-c["frames"] // 2), 4, 4) if c["smoke"] else (c["frames"] // 2, 12, 22)
        pixels = torch.randn(*grid, cfg.vision.patch_dim, device=dev)
        times, duration = [i * c["seconds"] / grid[0] for i in range(grid[0])], float(c["seconds"])
        media = (pixels, torch.randn(S, cfg.whisper.num_mel_bins, 2 * cfg.whisper.max_source_positions, device=dev))
    else:
        S = -(-c["seconds"] // int(cfg.segment_seconds))  # S Whisper segments
        pixels = torch.randn(c["frames"], 3, cfg.vision.image_size, cfg.vision.image_size, device=dev)
        times, duration = [i * c["seconds"] / c["frames"] for i in range(c["frames"])], float(c["seconds"])
        media = (pixels, torch.randn(S, cfg.whisper.num_mel_bins, 2 * cfg.whisper.max_source_positions, device=dev))
    mel = media[1]
    prompt = tuple(torch.randint(10, V, (n,)).tolist() for n in PROMPT_TOKENS)
    captions = [torch.randint(10, V, (c["caption_tokens"],)).tolist() for _ in range(3)]  # chosen (SFT's response), rejected, gt
    cached = (*model.encode(*media), times, duration)  # the feature cache's entry, on dev as Features.example puts it
    seq_len = model.sequence_length((cached, prompt, captions[0]))[0]
    prefix_len = seq_len - c["caption_tokens"]
    params = [p for p in model.parameters() if p.requires_grad]
    # lr 0: the work of a real AdamW step, but the weights stay put, so every row (and both gDPO schemes) sees one model
    opt = torch.optim.AdamW(params, lr=0.0)
    peak_flops, bandwidth = lookup(PEAK_FLOPS, dev), lookup(BANDWIDTH, dev)
    n_llm = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" not in n)
    vision = (f"ViT {cfg.vision.hidden_size} x {cfg.vision.depth} layers, {grid[0]} grids of {grid[1]} x {grid[2]} patches" if plus else
              f"SigLIP {cfg.vision.hidden_size} x {cfg.vision.keep_layers or cfg.vision.num_hidden_layers} layers at {cfg.vision.image_size} px")
    print(f"{torch.cuda.get_device_name(dev) if cuda else 'cpu'}, {time.strftime('%Y-%m-%d')}, {c['model']}, LLM {cfg.llm.hidden_size} x "
          f"{cfg.llm.num_hidden_layers} layers ({n_llm / 1e9:.2f}B), {vision}, Whisper "
          f"{cfg.whisper.d_model} x {cfg.whisper.encoder_layers} layers, {c['frames']} frames + {c['seconds']} s audio = "
          f"{prefix_len:,} prefix tokens, captions {c['caption_tokens']} tokens, sampling {c['samples']} x {c['sample_tokens']} tokens, "
          f"LoRA r {c['lora_r']}, median of {c['repeats']}")

    def measure(fn, oom_ok=False):
        """(median seconds of `repeats` calls after a warm-up, peak GB on GPU, the warm-up's result), or "OOM" for
        both when the card ran out of memory and oom_ok (a real outcome for the rows that may not fit)."""
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            first, ts = fn(), []
            for _ in range(c["repeats"]):
                if cuda:
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize(dev)
                ts.append(time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError:
            if not oom_ok:
                raise
            first = ts = None
        if ts is None:  # out of the except block, so its traceback no longer holds the step's tensors
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return "OOM", None, "OOM"
        return statistics.median(ts), torch.cuda.max_memory_allocated(dev) / 1e9 if cuda else None, first

    def train_step(loss_fn):
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    # 1. AV-SFT, as train_sft's loop runs it: one example of (features, prompt, response), mean token NLL
    model.train()
    flops, sft, rows = model.estimate_flops([(seq_len, c["caption_tokens"])]), {}, []
    for ckpt in (True, False):
        model.llm.activation_checkpointing = ckpt
        t, peak, _ = measure(lambda: train_step(lambda: step_loss(model, [(cached, prompt, captions[0])], 1, dev, amp)),
                             oom_ok=not ckpt)
        sft[ckpt] = t, flops / t / peak_flops if peak_flops and t != "OOM" else None  # (seconds, MFU)
        planned = plan(cfg, 1, seq_len, c["lora_r"], training.lora_targets, ckpt, 1, PLUS["trainable"] if plus else SFT_TRAINABLE,
                       training.lora_dropout, c["frames"], S, c["caption_tokens"],
                       grid[1] * grid[2] if plus else 0)["total"] / 1e9  # bytes the plan expects at this step's peak
        rows.append((f"SFT ckpt {'on' if ckpt else 'off'}", t, None if t == "OOM" else seq_len / t, "tok/s", sft[ckpt][1], peak, planned,
                     f"MFU of {peak_flops / 1e12:.0f} TFLOP/s" if peak_flops else "MFU: no peak FLOP/s for this device"))
    model.llm.activation_checkpointing = True

    # 2. gDPO, as train_mrdpo's train_round runs it: only the LoRA proxy trains, without dropout, the model in eval
    # mode (the policy must equal its reference at round start) but for the LLM, which checkpoints in train mode.
    for name, p in model.named_parameters():
        p.requires_grad_(p.requires_grad and any(t in name for t in train_mrdpo.trainable))
    for m in lora.lora_layers(model):
        m.dropout.p = train_mrdpo.lora_dropout
    model.eval()
    model.llm.train()
    with torch.no_grad(), lora.disabled(model), autocast(dev, amp):  # reference log-probs, recorded when the pair was sampled
        ref = model.continuation_logps(cached, prompt, captions[:2])[0]
    pair = {"chosen_ids": captions[0], "rejected_ids": captions[1], "gt_ids": captions[2],
            "ref_chosen": ref[0].item(), "ref_rejected": ref[1].item()}

    def gdpo():
        with autocast(dev, amp):
            return pair_step(model, [(cached, prompt, pair)], dev, DPO)[0]

    def five_pass():
        with autocast(dev, amp):
            return five_pass_loss(model, (pixels, mel, times, duration), prompt, captions, DPO["beta"], DPO["ce_weight"])

    tg, peak_g, loss_g = measure(lambda: train_step(gdpo))
    t5, peak_5, loss_5 = (None, None, None) if plus else measure(lambda: train_step(five_pass), oom_ok=True)  # v1's released scheme
    rows.append(("gDPO vs SFT", tg, (prefix_len + 3 * c["caption_tokens"]) / tg, "tok/s", tg / sft[True][0], peak_g, None,
                 "gDPO s / SFT ckpt on s (goal <= 1.5)"))
    rows.append(("gDPO vs 5-pass", t5, None, "-", None if t5 in ("OOM", None) else t5 / tg, peak_5, None, "5-pass s / gDPO s (goal >= 4)"))

    # 3. sampling, as MrDPO samples (model.sample: one prefill, n rows over its KV cache, nucleus), its decode timed on
    # its own: from the end of the prefill, the first pass of the LLM's final norm, to the last token, in the same call
    model.eval()
    n, M = c["samples"], c["sample_tokens"]

    def decode_seconds():
        ends = []

        def prefill_done(*_):
            if not ends:
                if cuda:
                    torch.cuda.synchronize(dev)
                ends.append(time.perf_counter())
        hook = model.llm.norm.register_forward_hook(prefill_done)
        try:
            with autocast(dev, amp):
                model.sample(cached, prompt, n=n, max_new_tokens=M, top_p=0.9)
        finally:
            hook.remove()
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter() - ends[0]
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    td = statistics.median([decode_seconds() for _ in range(1 + c["repeats"])][1:])  # after a warm-up
    peak_s = torch.cuda.max_memory_allocated(dev) / 1e9 if cuda else None
    decode = n * (M - 1) / td  # the first token of each row comes from the prefill; each of the M - 1 steps adds n
    # each decode step reads the LLM's weights once (not the embedding: a lookup; Qwen2-7B's head is untied) and
    # each of the n rows reads the prefix's keys and values
    weight_bytes = sum(p.numel() * p.element_size() for name, p in model.llm.named_parameters()
                       if not name.startswith("embed_tokens."))
    kv_bytes = n * 2 * cfg.llm.num_hidden_layers * cfg.llm.num_key_value_heads * cfg.llm.head_dim * prefix_len \
        * model.llm.embed_tokens.weight.element_size()  # (k, v) x layers x KV heads x head dim x tokens x bytes
    bound = n * bandwidth / (weight_bytes + kv_bytes) if bandwidth else None
    rows.append((f"sampling n={n}", td, decode, "tok/s", decode / bound if bound else None, peak_s, None,
                 f"bound {bound:.0f} tok/s: {bandwidth / 1e12:.2f} TB/s over {(weight_bytes + kv_bytes) / 1e9:.1f} GB per step"
                 if bound else "bound: no bandwidth for this device"))

    # 4. the frozen encoders, as encode runs them (no grad, in their own dtype: bf16 on GPU)
    dt = model.encoder_parameters()[0].dtype
    with torch.no_grad():
        if plus:
            tv, peak_v, _ = measure(lambda: model.encode(pixels, None))
            ta, peak_a, _ = measure(lambda: model.audio.features(mel.to(dt)))
        else:
            tv, peak_v, _ = measure(lambda: model.tower(pixels.to(dt)))
            ta, peak_a, _ = measure(lambda: model.speech_encoder(mel.to(dt)))
    rows.append(("ViT" if plus else "SigLIP", tv, c["frames"] / tv, "frames/s", None, peak_v, None, f"{c['frames']} frames in one batch"))
    rows.append(("Whisper", ta, S * 30 / ta, "audio-s/s", None, peak_a, None, f"{S} segments of 30 s in one batch"))
    rows.append(("cache saving", tv + ta, (tv + ta) * c["epoch_samples"] / 3600, "GPU-h/epoch", None, None, None,
                 f"encoder s/sample x {c['epoch_samples']:,} samples/epoch, after the epoch that fills the cache"))
    print(f"loss: gDPO {loss_g:.6f}, 5-pass {fmt(loss_5, 6)}")
    table(rows)
    print(f"sft_mfu: {'-' if sft[True][1] is None else f'{sft[True][1]:.2f}'}")


if __name__ == "__main__":
    run(main)
