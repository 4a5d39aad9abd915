"""
Per-GPU memory of video-SALMONN 2 7B LoRA SFT (train_sft.py) under FSDP2, from the config: parameters,
gradients, optimizer state, gathered (unsharded) parameters, activations, for W GPUs and for one; and of
video-SALMONN 2+ SFT (config/vs2plus_*_sft.py): 7B on one GPU and 8, 72B on 32 and 64 (4 and 8 nodes of 8).

What train_sft.py does, and so what is counted:
- build_model: trainable parameters (LoRA, the aligner, the projector...) in fp32, frozen ones in bf16;
- shard: fully_shard per LLM block, then the root with the SigLIP tower and Whisper as ignored_params, so
  everything else (LLM, projector, newline, aligner, LoRA) is sharded 1/W and the encoders are whole on
  every rank; MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32);
- gradients only for trainable parameters (fp32, sharded), AdamW's exp_avg and exp_avg_sq (fp32, sharded);
- Features warms the feature cache before the first step, so the encoders never run during a step: they
  hold weights, no activations;
- activations: the counts of what autograd saves come from reading model.py / lora.py op by op, and
  tests/test_memory_plan.py checks them against the tensors really saved by a tiny model's forward.
Parameter counts are exact: the model is built on the meta device, LoRA applied, and counted.
Not counted: the CUDA context and NCCL buffers (about 1 GiB, outside torch.cuda.max_memory_allocated),
allocator fragmentation, the optimizer step's temporaries (after backward, when activations are gone).

$ python bench/memory_plan.py                             # W = 8 and W = 1, checkpointing on and off
$ python bench/memory_plan.py --world=32 --frames=64      # any constant below
$ python bench/memory_plan.py --model=vs2plus_7b          # 2+ 7B (--model=vs2plus_72b: 72B on 32 and 64 GPUs)
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
from config import configure, run  # noqa: E402
from checkpoint import av_config_from_hf, plus_config_from_hf  # noqa: E402
from model import VideoSALMONN2  # noqa: E402
from model_plus import PlusConfig, VideoSALMONN2Plus  # noqa: E402

# -----------------------------------------------------------------------------
model = "vs2_7b"  # vs2_7b, or 2+: vs2plus_7b, vs2plus_72b (its constants below replace those of vs2_7b)
world = 8  # GPUs (FSDP2 ranks); the table adds W = 1
activation_checkpointing = True  # as config/vs2_7b_sft.py; the table adds the other setting
frames = 110  # max_frames of config/vs2_7b_sft.py: 110 x 182 = 20,020 video tokens
audio_segments = 2  # 30 s Whisper segments, 60 audio tokens each
prompt_tokens = 80  # chat template and instruction around the audio-visual block
response_tokens = 800  # the caption: the LM head and the loss run on these positions only
tokens = 0  # LLM sequence length; 0: the audio-visual block (model.av_length) + prompt + response
batch_size = 1  # sequences per GPU per step, as config/vs2_7b_sft.py
lora_r = 128  # the LoRA of config/vs2_7b_sft.py: r 128 on q, k, v, dropout 0.05
lora_targets = ("q_proj", "k_proj", "v_proj")
lora_dropout = 0.05
trainable = ("lora_", "audio.speech_Qformer.", "audio.speech_query_tokens", "audio.final_linear.",
             "projector.", "image_newline")  # as config/vs2_7b_sft.py
# -----------------------------------------------------------------------------
# Qwen2-7B's config.json (the LLM of LLaVA-OneVision-7B and of the released video-SALMONN 2); SigLIP and
# Whisper are the constants av_config_from_hf adds, as VideoSALMONN2.from_pretrained builds the model
QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False)
SFT_TRAINABLE = trainable
# Qwen2.5-VL-{7,72}B-Instruct's config.json (LLM and ViT) and the authors' 2+ audio_config defaults (Whisper-large-v3,
# the 3072-wide Q-Former), as VideoSALMONN2Plus.from_pretrained builds them
QWEN25_VL = {size: dict(vocab_size=152064, hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a,
                        num_key_value_heads=kv, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=h,
                                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
                        vision_start_token_id=151652, vision_end_token_id=151653, video_token_id=151656, audio_token_id=151665)
             for size, (h, i, n, a, kv) in {"7b": (3584, 18944, 28, 28, 4), "72b": (8192, 29568, 80, 64, 8)}.items()}
# config/vs2plus_*_sft.py: 768 frames (10 fps) -> 384 temporal grids; a 16:9 frame at 61,250 pixels is 168 x 308 px,
# 12 x 22 patches, 66 tokens; 76.8 s of audio -> three 30 s chunks
PLUS = dict(frames=768, grid_patches=264, audio_segments=3,
            trainable=("lora_", "visual.merger.", "audio.qformer.", "audio.q_tokens", "audio.audio_proj."))
PLUS_WORLDS = {"vs2plus_7b": (8, 1), "vs2plus_72b": (64, 32)}
BF16, FP32, INT64 = 2, 4, 8
GIB = 2 ** 30


def meta_model(cfg, r, targets):
    """The model as build_model makes it, on the meta device: shapes without memory."""
    with torch.device("meta"):
        model = VideoSALMONN2Plus(cfg) if isinstance(cfg, PlusConfig) else VideoSALMONN2(cfg)
        if r:
            lora.apply_lora(model.llm, targets, r)
    return model


def rows_per_rank(shape, world):
    """Elements of a tensor on FSDP2 rank 0: it shards dim 0 into chunks of ceil(rows / W) and pads the
    others to that size, so rank 0 holds the most; W = 1 holds it all."""
    return math.ceil(shape[0] / world) * math.prod(shape[1:]) if shape else 1


def param_bytes(model, world, trainable):
    """Bytes per GPU of the persistent state and of the unsharded parameters that live through a step."""
    encoders = {id(p) for p in model.encoder_parameters()}
    block = {id(p) for p in model.llm.layers[0].parameters()}
    out = dict(params=0, encoders=0, grads=0, optimizer=0, gathered=0)
    for name, p in model.named_parameters():
        trains = any(t in name for t in trainable)
        if id(p) in encoders:  # ignored_params: whole, bf16, on every rank
            out["encoders"] += p.numel() * BF16
            continue
        n = p.numel() if world == 1 else rows_per_rank(p.shape, world)
        out["params"] += n * (FP32 if trains else BF16)
        if trains:
            out["grads"] += n * FP32
            out["optimizer"] += 2 * n * FP32  # AdamW's exp_avg, exp_avg_sq (its step count stays on the CPU)
        if world == 1:  # no FSDP: autocast's bf16 copies of the fp32 weights, saved for backward
            out["gathered"] += p.numel() * BF16 if trains else 0
        elif id(p) in block:  # FSDP2 prefetch: about two blocks all-gathered (bf16) at once
            out["gathered"] += 2 * p.numel() * BF16
        elif not name.startswith("llm.layers."):  # the root unit (embeddings, head, projector, aligner)
            out["gathered"] += p.numel() * BF16  # stays gathered from its forward to the end of its backward
    out["params"] += out["encoders"]
    return out


# Activations, bf16 (b = 2 bytes) unless said. What autograd saves follows from which inputs need a
# gradient: the AV block carries one (the aligner and projector train), so every LLM block saves all
# below, the first included; a frozen Linear saves no input (its weight gets no gradient), a Linear with a
# trainable weight saves its input.
LINEAR_INPUT = {"q_proj": "norm1", "k_proj": "norm1", "v_proj": "norm1", "o_proj": "attn", "gate_proj": "norm2",
                "up_proj": "norm2", "down_proj": "act"}  # the tensor each Qwen2 block Linear reads


def block_saved(llm, L, r, targets, dropout, b=BF16, mask_bytes=1):
    """Bytes one Qwen2Block saves for backward over L tokens, as model.py computes it:
    - each RMSNorm: its fp32 upcast (L, D) (pow and the scale read it) and rsqrt (L, 1) fp32;
    - attention, SDPA flash / memory-efficient (no L x L matrix): q (L, D), k and v (L, n_kv * hd: GQA is
      not expanded), the output (L, D), the fp32 logsumexp (n_head, L); RoPE saves only the shared cos, sin;
    - the SwiGLU MLP: gate output (silu's input), silu output and up output (the product's two factors),
      each (L, I); gate, up, down are frozen, so their inputs are not saved;
    - LoRA on each target: dropout's mask (bool on CUDA: mask_bytes = 1) and the dropped input (L, in),
      which lora_A saves, and the r-wide intermediate, which lora_B saves. Without dropout lora_A saves the
      input itself: once for the adapters that share it, and not at all for o_proj's (SDPA's saved output,
      of which the (L, D) input is a view).
    With b = 2 and a bool mask: L * (8D + 8 + 4D + 4 kv + 4 n_head + 6I) + L * (3 in + 2r) per LoRA target;
    Qwen2-7B with r 128 on q, k, v: 191,864 bytes per token per block."""
    D, I = llm.hidden_size, llm.intermediate_size
    kv = llm.num_key_value_heads * llm.head_dim
    width = {"norm1": D, "attn": D, "norm2": D, "act": I}
    norms = 2 * L * (D + 1) * FP32
    attn = L * (2 * D + 2 * kv) * b + llm.num_attention_heads * L * FP32
    mlp = 3 * L * I * b
    adapters = len(targets) * L * r * b
    if dropout:
        adapters += sum(L * width[LINEAR_INPUT[t]] * (b + mask_bytes) for t in targets)
    else:
        adapters += sum(L * width[x] * b for x in {LINEAR_INPUT[t] for t in targets} - {"attn"})
    return norms + attn + mlp + adapters


def llm_saved(llm, L, R, r, targets, dropout, checkpointing, b=BF16, mask_bytes=1):
    """Bytes the LLM holds for backward at the end of forward for one sequence of L tokens, R of them the
    response (VideoSALMONN2.response_nll):
    - checkpointing off: every block's saved tensors; on: only each block's input hidden (L, D), which
      torch.utils.checkpoint keeps to recompute the block in backward;
    - RoPE's cos and sin (L, hd), shared by all blocks;
    - the final RMSNorm: fp32 upcast and rsqrt over all L positions (the norm runs before the slicing);
    - the loss: the head runs on the R response rows only; it is frozen, so it saves nothing; the logits
      are upcast to fp32, and log_softmax saves its fp32 output (R, V), which nll_loss reads too, with the
      int64 targets (R,) and its fp32 scalar total weight."""
    blocks = L * llm.hidden_size * b if checkpointing else block_saved(llm, L, r, targets, dropout, b, mask_bytes)
    rope = 2 * L * llm.head_dim * b
    final_norm = L * (llm.hidden_size + 1) * FP32
    loss = R * llm.vocab_size * FP32 + R * INT64 + FP32
    return llm.num_hidden_layers * blocks + rope + final_norm + loss


def backward_transient(llm, L, R, r, targets, dropout, checkpointing, b=BF16, mask_bytes=1):
    """Bytes that exist above the saved tensors at the peak of backward, the larger of:
    - the loss's backward: the fp32 gradients of log_softmax's output and input (R, V), then the bf16 one;
    - one block's backward: the block recomputed (checkpointing on), and its gradients in flight: the MLP's
      three (L, I) (of the product, then of silu's output and of up's, before the saved factors are freed)
      and the residual stream's two (L, D). An estimate, not checked by the tests."""
    loss = R * llm.vocab_size * (2 * FP32 + b)
    block = 3 * L * llm.intermediate_size * b + 2 * L * llm.hidden_size * b
    if checkpointing:
        block += block_saved(llm, L, r, targets, dropout, b, mask_bytes)
    return max(loss, block)


def projector_saved(cfg, frames, b=BF16):
    """Bytes of the visual path of one sequence: the cached tower features (frames, g^2, Cv) bf16, alive all
    step as the input, which the trainable projector's first Linear saves; GELU's input, the second Linear's
    input (GELU's output) and max_pool2d's input, each (frames, g^2, D); max_pool2d's int64 indices
    (frames, D, h, h). The 2x2 pool runs after the projector, so all of this is at 729, not 169, per frame."""
    g2, h = cfg.vision.grid ** 2, cfg.vision.grid // cfg.pool
    return frames * g2 * (cfg.vision.hidden_size + 3 * cfg.llm.hidden_size) * b + frames * cfg.llm.hidden_size * h * h * INT64


def aligner_saved(cfg, segments, b=BF16):
    """Bytes of the audio path: the cached Whisper features (S, 1500, Ca) bf16, alive all step, and the bf16
    copies of the fp32 ln_speech output that each trainable cross-attention key and value Linear saves
    (autocast casts once per op); the query path, one token per 0.5 s window, is negligible."""
    q = cfg.qformer
    return segments * q.frames_per_segment * q.encoder_width * b * (1 + 2 * q.layers)


def merger_saved(cfg, patches, b=BF16):
    """Bytes the trainable 2+ merger saves for backward over `patches` cached ViT features (patches, C): its input
    needs no gradient, so its RMSNorm saves only the normalised tensor (for the weight's gradient) and its product
    with the weight (the first Linear's input), then GELU's input and output (the second Linear's), each
    (patches, C) bf16 = (patches / 4, 4C). The cached features themselves are counted apart (plan)."""
    return 4 * patches * cfg.vision.hidden_size * b


def scatter_masks_saved(tokens, kinds):
    """Bytes of the bool masks (1, L, 1) that the 2+ embedding's masked_scatter saves, one for each kind of placed
    tokens (video, audio), whose source trains (the merger, the Q-Former) and so needs the mask in backward."""
    return kinds * tokens


def plus_audio_saved(cfg, segments, b=BF16):
    """Bytes of the 2+ audio path: the cached Whisper features (S, 1500, Ca) bf16, which every cross-attention key
    and value Linear reads as they are (no ln_speech before them: nothing new to save); the query path, one token
    per 0.5 s window, is negligible. An estimate, not checked by the tests."""
    return segments * cfg.qformer.frames_per_segment * cfg.qformer.encoder_width * b


def plan(cfg, world, tokens, lora_r=128, lora_targets=("q_proj", "k_proj", "v_proj"), activation_checkpointing=True,
         batch_size=1, trainable=SFT_TRAINABLE, lora_dropout=0.05, frames=110, audio_segments=2, response_tokens=800,
         grid_patches=264):
    """{part: bytes per GPU} of training with this AVConfig on `world` GPUs, batch_size sequences of `tokens`
    LLM tokens each (frames and audio_segments of them the AV block, response_tokens the response):
    params (sharded LLM and the rest + replicated encoders; encoders: that replicated part), grads,
    optimizer, gathered (FSDP2's unsharded bf16 root and two blocks; on one GPU autocast's bf16 copies of
    the fp32 weights), activations (saved tensors and the peak transient of backward), total."""
    model = meta_model(cfg, lora_r, lora_targets)
    out = param_bytes(model, world, trainable)
    args = (cfg.llm, tokens, response_tokens, lora_r, lora_targets if lora_r else (), lora_dropout, activation_checkpointing)
    if isinstance(cfg, PlusConfig):  # frames: 2-frame grids of grid_patches patches each
        patches = -(-frames // cfg.vision.temporal_patch_size) * grid_patches
        # the cached ViT features, alive all step as the batch's input, and what the merger saves
        visual = patches * cfg.vision.hidden_size * BF16 + merger_saved(cfg, patches)
        audio = plus_audio_saved(cfg, audio_segments) + scatter_masks_saved(tokens, (frames > 0) + (audio_segments > 0))
    else:
        projector_trains = any(any(t in "projector." + n for t in trainable) for n, _ in model.projector.named_parameters())
        visual = projector_saved(cfg, frames) if projector_trains else frames * cfg.vision.grid ** 2 * cfg.vision.hidden_size * BF16
        audio = aligner_saved(cfg, audio_segments)
    out["activations"] = batch_size * (llm_saved(*args) + visual + audio) + backward_transient(*args)
    out["total"] = sum(out[k] for k in ("params", "grads", "optimizer", "gathered", "activations"))
    return out


def main_plus(c):
    """The 2+ table: PLUS's frames, audio and trainable set, the LoRA and batch of c, the GPU counts of PLUS_WORLDS."""
    cfg = plus_config_from_hf(QWEN25_VL[c["model"].split("_")[1]])
    model = meta_model(cfg, c["lora_r"], c["lora_targets"])
    video = -(-PLUS["frames"] // cfg.vision.temporal_patch_size) * PLUS["grid_patches"] // cfg.vision.spatial_merge_size ** 2
    audio = PLUS["audio_segments"] * cfg.qformer.tokens_per_segment
    L = c["tokens"] or 2 + video + audio + c["prompt_tokens"] + c["response_tokens"]
    count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    n_lora = count(p for n, p in model.named_parameters() if "lora_" in n)
    n_train = count(p for n, p in model.named_parameters() if any(t in n for t in PLUS["trainable"]))
    aligner = count(p for n, p in model.audio.named_parameters() if n.startswith(("qformer.", "q_tokens", "audio_proj.")))
    print(f"video-SALMONN 2+ {c['model'].split('_')[1].upper()}, LoRA r {c['lora_r']} on {', '.join(c['lora_targets'])}, FSDP2, "
          f"{c['batch_size']} x {L:,} tokens per GPU ({PLUS['frames']} frames: {video:,} video + {audio} audio + 2 "
          f"+ {c['prompt_tokens']} prompt + {c['response_tokens']} response)")
    print(f"parameters: {count(model.parameters()):,}: LLM {count(model.llm.parameters()) - n_lora:,}, "
          f"ViT {count(model.visual.parameters()) - count(model.visual.merger.parameters()):,}, merger {count(model.visual.merger.parameters()):,}, "
          f"Whisper {count(model.audio.parameters()) - aligner:,}, Q-Former + q_tokens + audio_proj {aligner:,}, LoRA {n_lora:,}; "
          f"trainable {n_train:,} (fp32), the rest bf16")
    print(f"GiB per GPU{'':>9}{'params':>9}{'grads':>9}{'optim':>9}{'gathered':>10}{'activ':>9}{'total':>9}")
    for w in PLUS_WORLDS[c["model"]]:
        for ckpt in (c["activation_checkpointing"], not c["activation_checkpointing"]):
            p = plan(cfg, w, L, c["lora_r"], c["lora_targets"], ckpt, c["batch_size"], PLUS["trainable"], c["lora_dropout"],
                     PLUS["frames"], PLUS["audio_segments"], c["response_tokens"], PLUS["grid_patches"])
            cols = "".join(f"{p[k] / GIB:>{9 + (k == 'gathered')}.2f}" for k in ("params", "grads", "optimizer", "gathered", "activations", "total"))
            print(f"{w:>3} GPU{'s' if w > 1 else ' '} ckpt {'on ' if ckpt else 'off'}{'':>3}{cols}")


def main(argv):
    c = configure(globals(), argv)
    if c["model"] != "vs2_7b":
        return main_plus(c)
    cfg = av_config_from_hf(QWEN2_7B)
    audio = c["audio_segments"] * cfg.qformer.tokens_per_segment
    model = meta_model(cfg, c["lora_r"], c["lora_targets"])
    av = model.av_length(c["frames"], audio, 30.0 * c["audio_segments"])  # Eq. 4-6 stretch the audio over the frames
    L = c["tokens"] or av + c["prompt_tokens"] + c["response_tokens"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    n_train = sum(p.numel() for n, p in model.named_parameters() if any(t in n for t in c["trainable"]))
    print(f"video-SALMONN 2 7B, LoRA r {c['lora_r']} on {', '.join(c['lora_targets'])}, FSDP2, "
          f"{c['batch_size']} x {L:,} tokens per GPU ({c['frames']} frames x {cfg.tokens_per_frame} + {av - c['frames'] * cfg.tokens_per_frame} audio "
          f"+ {c['prompt_tokens']} prompt + {c['response_tokens']} response)")
    print(f"parameters: {count(model):,}: LLM {count(model.llm) - n_lora:,}, SigLIP {count(model.tower):,}, "
          f"Whisper {count(model.speech_encoder):,}, projector + newline {count(model.projector) + cfg.llm.hidden_size:,}, "
          f"aligner {count(model.audio):,}, LoRA {n_lora:,}; trainable {n_train:,} (fp32), the rest bf16")
    print(f"GiB per GPU{'':>9}{'params':>9}{'grads':>9}{'optim':>9}{'gathered':>10}{'activ':>9}{'total':>9}")
    for w in dict.fromkeys((c["world"], 1)):
        for ckpt in (c["activation_checkpointing"], not c["activation_checkpointing"]):
            p = plan(cfg, w, L, c["lora_r"], c["lora_targets"], ckpt, c["batch_size"], c["trainable"], c["lora_dropout"],
                     c["frames"], c["audio_segments"], c["response_tokens"])
            cols = "".join(f"{p[k] / GIB:>{9 + (k == 'gathered')}.2f}" for k in ("params", "grads", "optimizer", "gathered", "activations", "total"))
            print(f"{w:>3} GPU{'s' if w > 1 else ' '} ckpt {'on ' if ckpt else 'off'}{'':>3}{cols}")


if __name__ == "__main__":
    run(main)
