"""MMCoconut: GPT-2 reading CLIP image tokens and thinking in continuous latent tokens (Coconut).

Multi-pass forward with a KV cache (Coconut semantics). The loader aligns rows so latent j of every row sits at
column L0 + j. With n = max latents in the batch (MAX over ranks when torch.distributed is initialized, so every
rank makes the same number of LM calls, required under ZeRO-3), the LM runs n + 1 times:

    pass 0          columns [0, L0)                      image tokens spliced in from the projector
    pass i (1..n-1) column  L0 + i - 1 (latent i - 1)    filled with the last hidden state of column L0 + i - 2
    pass n          columns [L0 + n - 1, T)              latent n - 1 filled likewise, then the rest

Latent j (column L0 + j) receives the last-layer (post ln_f) hidden state of column L0 + j - 1, for rows that have
more than j latents; other rows keep their ordinary token embedding there. Every pass reuses the cache of the
previous ones, so each column is computed once. A batch without latents while n > 0 (another rank has some) is split
at T - n the same way. Gradients flow through the latent chain (nothing is detached).

Activation memory: pass i keeps the usual per-layer activations of its new columns only, plus, because the
DynamicCache grows by concatenation, a fresh K and V copy per layer covering all columns so far
(2 · n_layer · B · cols · n_embd per pass) that attention saves for backward. No per-layer hidden states are
requested (no output_hidden_states); the last hidden state of each pass is kept (it becomes the logits via one
lm_head call over the whole sequence, and its last column feeds the next latent).

All input embeddings (image splice, latent fill, every cached slice, generation steps) go through `_embed`,
which calls `mmcoconut.kernels.inject_embeddings`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..tokens import SpecialIds
from .vision import encode_images

try:
    from ..kernels import inject_embeddings
except ImportError:  # the kernels package is optional at import time; same semantics, plain autograd
    def inject_embeddings(input_ids, weight, sources, source_index):
        emb = F.embedding(input_ids.masked_fill(source_index >= 0, 0), weight)
        if sources.shape[0] == 0:  # nothing to inject (decoding steps)
            return emb
        picked = sources.index_select(0, source_index.clamp_min(0).flatten()).view_as(emb)
        return torch.where((source_index >= 0).unsqueeze(-1), picked, emb)

IGNORE = -100
DUMMY_MODES = (None, "zeros", "random")


class MMCoconutOutput(NamedTuple):
    """A NamedTuple so that DeepSpeed ZeRO-3 finds the output tensors (its backward hooks need them)."""
    loss: Optional[torch.Tensor]
    logits: torch.Tensor
    n_passes: int


@dataclass
class _State:
    """What generation needs after encoding a prompt."""
    hidden: torch.Tensor  # [B, T, D] last hidden states (original T)
    mask: torch.Tensor  # [B, T + pad] attention mask covering everything in the cache
    position_ids: torch.Tensor  # [B, T]
    cache: object
    n_passes: int


def _dist_max(value: int, device) -> int:
    d = torch.distributed
    if not (d.is_available() and d.is_initialized()) or d.get_world_size() == 1:
        return value
    if d.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.long, device=device)
    d.all_reduce(t, op=d.ReduceOp.MAX)
    return int(t.item())


class MMCoconut(nn.Module):
    def __init__(self, lm, vision, projector, ids: SpecialIds, n_image_tokens: int, image_tokens: str = "pooled",
                 vision_layer: int = -2, freeze_vision: bool = True):
        super().__init__()
        self.lm, self.vision, self.projector = lm, vision, projector
        self.ids, self.n_image_tokens = ids, n_image_tokens
        self.image_tokens, self.vision_layer, self.freeze_vision = image_tokens, vision_layer, freeze_vision
        self._zero3_registered = False
        self._cache_kw = "cache" if "cache" in inspect.signature(lm.transformer.forward).parameters \
            else "past_key_values"
        self._maybe_register_zero3()

    # ------------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_vision:
            self.vision.eval()  # frozen tower: no dropout, whatever the outer mode
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        # Frozen tower on CUDA runs in half precision (the seed's behaviour). Not for ZeRO-3 partitioned params.
        p = next(self.vision.parameters(), None)
        if (self.freeze_vision and p is not None and p.is_cuda and p.dtype == torch.float32
                and not hasattr(p, "ds_id")):
            self.vision.half()
        return self

    # --------------------------------------------------------------------------------------- embeddings
    def _maybe_register_zero3(self, in_forward: bool = False) -> None:
        """ZeRO-3 partitions wte.weight, which `_embed` reads outside wte's forward: register it as an external
        parameter of this module so DeepSpeed gathers it for our forward/backward. Done at construction (model
        built under zero.Init / HfDeepSpeedConfig) or at the first forward after deepspeed.initialize partitioned
        it; in the latter case it is gathered once by hand, as DeepSpeed's own parameter getter does. `generate`
        is not a forward call, so `_embed` also gathers the weight whenever it finds it released (no grad there;
        all ranks make the same calls because pass counts and stopping are synchronised)."""
        w = self.lm.transformer.wte.weight
        if self._zero3_registered or not hasattr(w, "ds_id"):
            return
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        deepspeed.zero.register_external_parameter(self, w)
        self._zero3_registered = True
        if in_forward and w.ds_status == ZeroParamStatus.NOT_AVAILABLE:
            w.all_gather()  # this forward's pre-hook ran before the registration

    def _embed(self, input_ids: torch.Tensor, sources: Optional[torch.Tensor],
               source_index: Optional[torch.Tensor]) -> torch.Tensor:
        """THE input-embedding function: row = sources[idx] if idx >= 0 else wte[id] (mmcoconut.kernels op)."""
        w = self.lm.transformer.wte.weight
        if getattr(w, "ds_status", None) is not None and w.ds_status.name == "NOT_AVAILABLE":
            w.all_gather()  # ZeRO-3 outside our forward (generate): gather it as DeepSpeed's getter would
        if sources is None or source_index is None:
            sources = w.new_zeros((0, w.shape[1]))
            source_index = torch.full_like(input_ids, -1)
        return inject_embeddings(input_ids, w, sources.to(w.dtype), source_index)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> projected image tokens [B, n_img, n_embd]."""
        if self.freeze_vision:
            with torch.no_grad():
                feats = encode_images(self.vision, pixel_values, self.image_tokens, self.vision_layer)
        else:
            feats = encode_images(self.vision, pixel_values, self.image_tokens, self.vision_layer)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(feats.to(proj_dtype))

    # --------------------------------------------------------------------------------------- planning
    def _plan(self, input_ids, attention_mask, pixel_values, position_ids, sync: bool, prefix=None):
        """Validate the batch (one host sync) and precompute what both forwards need. Only the first `prefix`
        columns (default all) are searched for <image>/<latent> (generated tokens are plain tokens)."""
        B, T = input_ids.shape
        dev = input_ids.device
        is_img = input_ids == self.ids.image
        is_lat = input_ids == self.ids.latent
        if prefix is not None and prefix < T:
            keep = (torch.arange(T, device=dev) < prefix)[None]
            is_img, is_lat = is_img & keep, is_lat & keep
        counts = is_lat.sum(1)
        any_col = is_lat.any(0)
        l0 = torch.where(any_col.any(), any_col.long().argmax(), torch.zeros((), dtype=torch.long, device=dev))
        ar = torch.arange(T, device=dev)
        expected = (ar >= l0) & (ar < l0 + counts[:, None])
        img_cols = is_img.any(0)
        img_last = torch.where(img_cols.any(), T - 1 - img_cols.flip(0).long().argmax(), torch.full_like(l0, -1))
        aligned = (expected == is_lat).all()
        host = torch.cat([counts, is_img.sum(1), torch.stack([l0, img_last, aligned.long()])]).tolist()
        counts_h, img_h, (l0, img_last, aligned) = host[:B], host[B:2 * B], host[2 * B:]
        if not aligned:
            raise ValueError("latent tokens are not aligned: every row's latents must be contiguous and start at "
                             f"the same column (first latent column {l0}, per-row counts {counts_h}); "
                             "use mmcoconut.data.collate.Collator / GenerationCollator")
        if pixel_values is None and img_last >= 0:
            raise ValueError("batch has <image> tokens but no pixel_values")
        if pixel_values is not None and any(c != self.n_image_tokens for c in img_h):
            raise ValueError(f"each row needs exactly {self.n_image_tokens} <image> tokens (image_tokens="
                             f"{self.image_tokens!r}), got per-row counts {img_h}")
        m_local = max(counts_h) if B else 0
        n = _dist_max(m_local, dev) if sync else m_local
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if m_local > 0:
            if l0 == 0:
                raise ValueError("a latent token at column 0 has no preceding hidden state")
            start, pad = l0, max(0, l0 + n - T)  # pass n needs column start + n - 1
        else:  # no local latents but another rank has n: split at T - n (right-pad if T < n + 1)
            start, pad = max(T - n, 1), max(0, n + 1 - T)
        img_index = feats = None
        if pixel_values is not None:
            feats = self.image_features(pixel_values).flatten(0, 1)  # [B * n_img, D]
            rank = is_img.long().cumsum(1) - 1 + torch.arange(B, device=dev)[:, None] * self.n_image_tokens
            img_index = torch.where(is_img, rank, -1)
        if pad:  # right-pad (masked) so that every rank makes n + 1 calls
            input_ids = F.pad(input_ids, (0, pad), value=self.ids.pad)
            attention_mask = F.pad(attention_mask, (0, pad), value=0)
            position_ids = torch.cat([position_ids, position_ids[:, -1:].expand(B, pad)], 1)
            is_lat = F.pad(is_lat, (0, pad), value=False)
            if img_index is not None:
                img_index = F.pad(img_index, (0, pad), value=-1)
        Tp = T + pad
        bounds = [(0, Tp)] if n == 0 else \
            [(0, start)] + [(start + i, start + i + 1) for i in range(n - 1)] + [(start + n - 1, Tp)]
        return dict(T=T, n=n, m_local=m_local, start=start, bounds=bounds, input_ids=input_ids,
                    attention_mask=attention_mask, position_ids=position_ids, is_lat=is_lat, feats=feats,
                    img_index=img_index, img_last=img_last)

    @staticmethod
    def _fill(h_prev: torch.Tensor, dummy: Optional[str]) -> torch.Tensor:
        """Latent input from the previous column's last hidden state (or the dummy-latent ablation)."""
        if dummy is None:
            return h_prev
        if dummy == "zeros":
            return torch.zeros_like(h_prev)
        if dummy == "random":
            r = torch.randn_like(h_prev)
            return r * (h_prev.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        raise ValueError(f"dummy_latent must be one of {DUMMY_MODES}, got {dummy!r}")

    def _run_lm(self, embeds, attention_mask, position_ids, cache):
        kw = {self._cache_kw: cache} if cache is not None else {}
        out = self.lm.transformer(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=cache is not None, **kw)
        return out.last_hidden_state

    # ------------------------------------------------------------------------------------ multi-pass
    def _multipass(self, input_ids, attention_mask, pixel_values=None, position_ids=None, dummy_latent=None,
                   sync: bool = True) -> _State:
        from transformers import DynamicCache

        if dummy_latent not in DUMMY_MODES:
            raise ValueError(f"dummy_latent must be one of {DUMMY_MODES}, got {dummy_latent!r}")
        if self.lm.transformer.gradient_checkpointing and self.training:
            raise ValueError("MMCoconut's KV-cached multi-pass forward is incompatible with HF gradient "
                             "checkpointing (it drops the cache); disable it")
        self._maybe_register_zero3(in_forward=True)
        p = self._plan(input_ids, attention_mask, pixel_values, position_ids, sync)
        ids, mask, pos, is_lat = p["input_ids"], p["attention_mask"], p["position_ids"], p["is_lat"]
        B = ids.shape[0]
        rows = torch.arange(B, device=ids.device)
        try:
            cache = DynamicCache(config=self.lm.config)
        except TypeError:  # older transformers
            cache = DynamicCache()
        hs, h_last = [], None
        for k, (a, b) in enumerate(p["bounds"]):
            srcs, index = [], None
            if p["feats"] is not None and a <= p["img_last"]:
                srcs.append(p["feats"])
                index = p["img_index"][:, a:b]
            if k > 0 and a - p["start"] < p["m_local"]:  # latent column a gets the hidden state of column a - 1
                base = sum(s.shape[0] for s in srcs)
                col = torch.where(is_lat[:, a], rows + base, -1)
                index = torch.full_like(ids[:, a:b], -1) if index is None else index.clone()
                index[:, 0] = torch.where(col >= 0, col, index[:, 0])
                srcs.append(self._fill(h_last, dummy_latent))
            emb = self._embed(ids[:, a:b], torch.cat(srcs) if srcs else None, index)
            h = self._run_lm(emb, mask[:, :b], pos[:, a:b], cache)
            hs.append(h)
            h_last = h[:, -1]
        hidden = torch.cat(hs, 1)[:, :p["T"]] if len(hs) > 1 else hs[0][:, :p["T"]]
        return _State(hidden, mask, pos[:, :p["T"]], cache, len(p["bounds"]))

    def _output(self, hidden, labels, n_passes) -> MMCoconutOutput:
        logits = self.lm.lm_head(hidden)
        loss = None
        if labels is not None:
            lbl = labels[:, 1:].reshape(-1)
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), lbl,
                                 ignore_index=IGNORE, reduction="sum")
            loss = ce / (lbl != IGNORE).sum().clamp_min(1)
        return MMCoconutOutput(loss=loss, logits=logits, n_passes=n_passes)

    def forward(self, input_ids, attention_mask, labels=None, pixel_values=None, position_ids=None,
                dummy_latent: Optional[str] = None, **unused) -> MMCoconutOutput:
        """KV-cached multi-pass forward; loss = token CE over labels (HF shift, -100 ignored), mean over tokens."""
        st = self._multipass(input_ids, attention_mask, pixel_values, position_ids, dummy_latent)
        return self._output(st.hidden, labels, st.n_passes)

    def naive_forward(self, input_ids, attention_mask, labels=None, pixel_values=None, position_ids=None,
                      dummy_latent: Optional[str] = None, special_prefix: Optional[int] = None,
                      **unused) -> MMCoconutOutput:
        """Reference without a cache: n + 1 full-sequence passes, pass k fills latents 0..k-1 and reads the hidden
        state that feeds latent k. Same outputs as `forward` (local n; no cross-rank sync). special_prefix: as
        in `_plan`."""
        if dummy_latent not in DUMMY_MODES:
            raise ValueError(f"dummy_latent must be one of {DUMMY_MODES}, got {dummy_latent!r}")
        self._maybe_register_zero3(in_forward=True)
        p = self._plan(input_ids, attention_mask, pixel_values, position_ids, sync=False, prefix=special_prefix)
        ids, mask, pos, is_lat = p["input_ids"], p["attention_mask"], p["position_ids"], p["is_lat"]
        B, Tp = ids.shape
        n, start = p["n"], p["start"]
        base_src = [p["feats"]] if p["feats"] is not None else []
        base_index = p["img_index"] if p["img_index"] is not None else torch.full_like(ids, -1)
        offset = sum(s.shape[0] for s in base_src)
        rows = torch.arange(B, device=ids.device)
        fills = []
        for k in range(n + 1):
            index = base_index.clone()
            for j in range(k):  # latent j <- fills[j]
                c = start + j
                index[:, c] = torch.where(is_lat[:, c], offset + j * B + rows, index[:, c])
            srcs = base_src + fills
            emb = self._embed(ids, torch.cat(srcs) if srcs else None, index if srcs else None)
            h = self._run_lm(emb, mask, pos, None)
            if k < n:
                fills.append(self._fill(h[:, start + k - 1], dummy_latent))
        return self._output(h[:, :p["T"]], labels, n + 1)

    # ------------------------------------------------------------------------------------ generation
    def generate(self, input_ids, attention_mask, pixel_values=None, position_ids=None, max_new_tokens: int = 64,
                 dummy_latent: Optional[str] = None) -> list[list[int]]:
        """Greedy KV-cached generation (see mmcoconut.model.generate); new tokens per row, EOS excluded."""
        from .generate import generate
        return generate(self, input_ids, attention_mask, pixel_values, position_ids=position_ids,
                        max_new_tokens=max_new_tokens, dummy_latent=dummy_latent)
