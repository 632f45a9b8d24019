"""Micro-batch sizing from a memory model: the largest micro-batch that fits one GPU, by arithmetic only.

Bytes per GPU for a model (LM shape + vision tower), sequence length Tp, precision, ZeRO stage and world size:

  states       weights, gradients and AdamW states, partitioned by ZeRO stage (1: optimizer states, 2: + gradients,
               3: + weights): 16-bit training keeps 2 B weights + 2 B gradients (4 B with fp32 gradient
               accumulation, DeepSpeed's BF16_Optimizer) + 12 B fp32 master/exp_avg/exp_avg_sq per parameter;
               fp32 training 4 + 4 + 8. The frozen vision tower: 16-bit weights, no gradients.
  buffers      DeepSpeed's communication buckets (reduce / allgather; ZeRO-3: prefetch + live gathered weights)
  activations  what autograd keeps per token and layer, in elements (ActCoeffs: d*D + kv*D_kv + f*F + t*Tp + c,
               calibrated with mmcoconut.testing.saved_activation_bytes on CPU, tests/test_sizing.py), plus per
               latent pass and row `pass_dt * D * Tp` per layer (the one-column passes' copies of the cache slices
               they read, measured on CPU; an upper bound where the attention kernel reads the cache in place)
  loss         the label-only loss (modeling/loss.py): gathered [K, D] rows + one chunk of fp32 logits, their
               gradient and the 16-bit head output (K = every token: an upper bound)
  transient    the backward's working set: two layers' worth of activation gradients + two [V, D] table gradients
  reserve      CUDA context and allocator slack: RESERVE_GIB + FRAGMENTATION of the rest

The optimizer step replaces activations by the fp32 gradient copy of this rank's partition (step phase); the peak
is the larger phase. Estimates, not measurements: bench/gpu_bench.py measures the peak on a card.
``python -m mmcoconut.cli.sizing`` prints the table (docs/training.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

GIB = 1 << 30
RESERVE_GIB = 1.0  # CUDA context + cuBLAS/NCCL workspaces, outside the caching allocator
FRAGMENTATION = 0.05  # caching-allocator slack on top of the live peak
CHUNK_BYTES = 1 << 28  # modeling/loss.py: fp32 logits of one loss chunk

Precision = Literal["fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class ActCoeffs:
    """Elements autograd keeps per token and layer: d*D + kv*D_kv + f*F + t*Tp + c (at the training dtype), plus
    `up` fp32 elements per D in 16-bit training (norms that upcast), and `pass_dt * D * Tp` per row and latent pass."""
    d: float
    kv: float
    f: float
    t: float
    c: float
    up: float = 0.0
    pass_dt: float = 0.75


# Measured on CPU with saved_activation_bytes (tests/test_sizing.py re-measures them):
#   gpt2   MMCoconut's multi-pass GPT-2 (static KV cache = the kv term, 4-D mask -> t = 1, gelu_new keeps 5 F)
#   llama  Hugging Face Llama/Qwen2 blocks (RMSNorm upcasts to fp32: up = 1, SwiGLU keeps 4 F); t = 1 for the
#          4-D mask MMCoconut passes
ACT = {"gpt2": ActCoeffs(d=6, kv=2, f=5, t=1, c=13), "llama": ActCoeffs(d=8, kv=2, f=4, t=1, c=12, up=1)}


@dataclass(frozen=True)
class LMShape:
    name: str
    family: Literal["gpt2", "llama"]
    vocab: int
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_ff: int
    tied: bool
    positions: int = 0  # learned position table (GPT-2)

    @property
    def d_kv(self) -> int:
        return self.n_kv_head * (self.d_model // self.n_head)

    @property
    def params(self) -> int:
        D, F, L = self.d_model, self.d_ff, self.n_layer
        attn = 2 * D * D + 2 * D * self.d_kv
        mlp = (2 if self.family == "gpt2" else 3) * D * F
        extra = (9 * D + F) if self.family == "gpt2" else (2 * D + 2 * self.d_kv)  # biases/norms (GPT-2), qkv bias
        emb = self.vocab * D * (1 if self.tied else 2) + self.positions * D
        return emb + L * (attn + mlp + extra) + 2 * D


@dataclass(frozen=True)
class VisionShape:
    name: str
    params: int
    hidden: int
    tokens: int  # patch tokens + CLS through the frozen tower


LMS = {
    "gpt2": LMShape("GPT-2 124M", "gpt2", 50262, 768, 12, 12, 12, 3072, tied=True, positions=1024),
    "qwen2.5-0.5b": LMShape("Qwen2.5-0.5B", "llama", 151936, 896, 24, 14, 2, 4864, tied=True),
    "llama-3.2-1b": LMShape("Llama-3.2-1B", "llama", 128256, 2048, 16, 32, 8, 8192, tied=True),
    "llama-3-8b": LMShape("Llama-3-8B", "llama", 128256, 4096, 32, 32, 8, 14336, tied=False),
}
VISIONS = {"clip-b32": VisionShape("CLIP ViT-B/32", 87_800_000, 768, 50),
           "clip-l14": VisionShape("CLIP ViT-L/14", 303_200_000, 1024, 257)}


@dataclass(frozen=True)
class Setup:
    """What the memory depends on besides the micro-batch."""
    lm: LMShape
    vision: VisionShape = VISIONS["clip-b32"]
    seq: int = 256  # padded sequence length Tp (image tokens included)
    precision: Precision = "bf16"
    zero: int = 1
    world: int = 1
    latent_passes: int = 6  # one-column latent passes (stage x c_thought; A-OKVQA's last stage: 3 x 2)
    dropout: bool = False  # GPT-2-style residual dropout keeps a 1-byte mask of D twice per layer
    grad_accum_fp32: Optional[bool] = None  # None: as DeepSpeed does (bf16 -> fp32 accumulation)
    reduce_bucket: Optional[float] = None  # elements; None: as the shipped ds_configs (2e8 ZeRO-1/2, 5e7 ZeRO-3)
    allgather_bucket: float = 2e8
    max_live_params: float = 1e9  # ZeRO-3 stage3_max_live_parameters
    offload: bool = False  # ZeRO-3 with optimizer and parameters offloaded to the CPU: no states on the GPU


def _unit(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def state_bytes(s: Setup) -> dict:
    """Per-GPU bytes of weights / gradients / optimizer states (LM + projector trainable, vision frozen)."""
    P = s.lm.params + s.vision.hidden * s.lm.d_model + s.lm.d_model ** 2  # + mlp2x projector
    half = s.precision != "fp32"
    acc32 = s.grad_accum_fp32 if s.grad_accum_fp32 is not None else s.precision == "bf16"
    w, g, o = (2, 4 if acc32 else 2, 12) if half else (4, 4, 8)
    part = lambda nbytes, stage: 0.0 if s.offload else nbytes / s.world if s.zero >= stage else nbytes  # noqa: E731
    return {"params": P, "weights": part(w * P, 3), "grads": part(g * P, 2), "optimizer": part(o * P, 1),
            "vision": s.vision.params * (2 if half else 4),
            "step_fp32_grads": 0.0 if s.offload else 4 * P / (s.world if s.zero else 1)}


def buffer_bytes(s: Setup) -> float:
    u = _unit(s.precision)
    if s.zero == 0:
        return 0.0
    if s.zero < 3:
        return ((s.reduce_bucket or 2e8) + (s.allgather_bucket if s.world > 1 else 0)) * u
    return (s.reduce_bucket or 5e7) * (u + 4) + min(s.max_live_params, s.lm.params) * u


def layer_bytes(lm: LMShape, seq: int, precision: str = "bf16", dropout: bool = False, mask: bool = True) -> float:
    """Bytes autograd keeps per token and layer (ACT; mask=False drops the 4-D mask term, as in a plain HF call)."""
    a, u = ACT[lm.family], _unit(precision)
    elems = a.d * lm.d_model + a.kv * lm.d_kv + a.f * lm.d_ff + (a.t * seq if mask else 0) + a.c
    return elems * u + (a.up * lm.d_model * 4 if u == 2 else 0) + (2 * lm.d_model if dropout else 0)


def activation_bytes(lm: LMShape, batch: int, seq: int, precision: str = "bf16", latent_passes: int = 0,
                     dropout: bool = False) -> float:
    """Bytes autograd keeps for one micro-batch of `batch` rows x `seq` columns (the measured per-token model)."""
    u = _unit(precision)
    per_token = lm.n_layer * layer_bytes(lm, seq, precision, dropout) + 2 * lm.d_model * u  # + embedding, final norm
    per_row_pass = lm.n_layer * ACT[lm.family].pass_dt * lm.d_model * seq * u
    return batch * (seq * per_token + latent_passes * per_row_pass)


def loss_bytes(lm: LMShape, batch: int, seq: int, precision: str = "bf16") -> float:
    u, K = _unit(precision), batch * seq
    rows = min(K, max(1, CHUNK_BYTES // (4 * lm.vocab)))
    return K * lm.d_model * u + rows * lm.vocab * (4 + 4 + u)


def breakdown(s: Setup, batch: int) -> dict:
    """Every term in bytes, and the peak."""
    st = state_bytes(s)
    u, lm = _unit(s.precision), s.lm
    act = activation_bytes(lm, batch, s.seq, s.precision, s.latent_passes, s.dropout)
    layer = activation_bytes(lm, batch, s.seq, s.precision, 0, s.dropout) / lm.n_layer
    terms = {"weights": st["weights"], "grads": st["grads"], "optimizer": st["optimizer"], "vision": st["vision"],
             "buffers": buffer_bytes(s), "activations": act, "loss": loss_bytes(lm, batch, s.seq, s.precision),
             "transient": 2 * layer + 2 * lm.vocab * lm.d_model * u}
    static = terms["weights"] + terms["grads"] + terms["optimizer"] + terms["vision"] + terms["buffers"]
    train_phase = terms["activations"] + terms["loss"] + terms["transient"]
    live = static + max(train_phase, st["step_fp32_grads"])
    terms["peak"] = RESERVE_GIB * GIB + live * (1 + FRAGMENTATION)
    return terms


def max_micro_batch(s: Setup, gpu_gib: float, limit: int = 8192) -> int:
    """Largest micro-batch whose peak fits `gpu_gib` GiB (0: not even one row)."""
    budget = gpu_gib * GIB
    if breakdown(s, 1)["peak"] > budget:
        return 0
    lo, hi = 1, 2
    while hi <= limit and breakdown(s, hi)["peak"] <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # peak(lo) fits, peak(hi) does not (or hi is past the limit)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if breakdown(s, mid)["peak"] <= budget else (lo, mid)
    return lo
