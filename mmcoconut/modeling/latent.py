"""MMCoconut: a causal LM reading vision-tower image tokens and thinking in continuous latent tokens (Coconut).

Backbones: GPT-2, Llama, Qwen2, Mistral LMs; CLIP or SigLIP towers (what differs per family: families.py).
Multi-pass forward with a KV cache (Coconut semantics). The loader aligns rows so latent j of every row sits at
column L0 + j. With n = max latents in the batch (MAX over ranks through `agree_pass_count`, which a multi-rank
engine installs so that every rank makes the same number of LM calls, as sharded weights require), the LM runs
n + 1 times:

    pass 0          columns [0, L0)                      image tokens spliced in from the projector
    pass i (1..n-1) column  L0 + i - 1 (latent i - 1)    filled with the last hidden state of column L0 + i - 2
    pass n          columns [L0 + n - 1, T)              latent n - 1 filled likewise, then the rest

Latent j (column L0 + j) receives the last-layer hidden state (after the final norm; upstream Coconut's
`hidden_states[-1]`) of column L0 + j - 1, for rows that have more than j latents; other rows keep their ordinary
token embedding there. Every pass reuses the cache of the
previous ones, so each column is computed once. A batch without latents while n > 0 (another rank has some) is split
at T - n the same way. Gradients flow through the latent chain (nothing is detached).

Hot path (GPU-ready): the pass layout comes from the host (`latent_plan`, made by the Collator; see pass_plan.py),
so `forward` with a plan reads no device data. All token columns are embedded once per micro-batch through
`inject.inject_embeddings` (one [V, D] weight gradient; image features injected there); each later pass
only writes its latent rows into its slice (torch.where). The KV cache is static (kvcache.py): preallocated
buffers written in place; activation memory per pass = its own columns' activations plus no K/V copies.
`enable_compile` compiles the per-pass LM call (torch.compile; CUDA graphs for the one-column passes). In eager
training the weight gradients of the decoder's projections (Conv1D or nn.Linear) over all passes are summed in place
into one buffer per weight (wgrad.py; `deferred_wgrad`, train.deferred_wgrad): one weight gradient per micro-batch,
as for the embedding table. `set_gradient_checkpointing` checkpoints every decoder-layer call of every pass
(non-reentrant; the cache is written by commit() outside the LM call, so a recomputed layer writes nothing).
Nothing here knows a distributed engine: the engine installs `agree_pass_count`, `agree_stop` and `gather_param`.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .tokens import SpecialIds
from .families import (check_window, decoder_layers, kv_geometry, lm_family, refuse_reentrant, set_checkpointing,
                       weight_grad_modules)
from .inject import inject_embeddings
from .kvcache import StaticKV, install as install_kv_hook
from .loss import labelled_cross_entropy
from .pass_plan import LatentPlan, Layout, plan_batch
from .vision import encode_images
from .wgrad import deferred_weight_grads


DUMMY_MODES = (None, "zeros", "random")
LATENT_SCALES = ("none", "embedding")  # model.latent_scale: the fed-back hidden state as is | at the embedding row norm
DEBUG = os.environ.get("MMCOCONUT_DEBUG") == "1"  # re-plan from input_ids and compare with a given latent_plan
COMPILE_BUCKET = 64  # with enable_compile, sequence buffers are padded to a multiple of this (few distinct shapes)


class MMCoconutOutput(NamedTuple):
    """A NamedTuple so that DeepSpeed ZeRO-3 finds the output tensors (its backward hooks need them)."""
    loss: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]  # None with return_logits=False (training: the loss never makes [B, T, V] logits)
    n_passes: int


@dataclass
class _State:
    """What generation needs after encoding a prompt."""
    hidden: torch.Tensor  # [B, T, D] last hidden states (original T)
    mask: torch.Tensor  # [B, T + pad] attention mask covering everything in the cache
    position_ids: torch.Tensor  # [B, T]
    cache: object  # transformers DynamicCache of the T + pad columns (None when not requested)
    n_passes: int


class MMCoconut(nn.Module):
    def __init__(self, lm, vision, projector, ids: SpecialIds, n_image_tokens: int, image_tokens: str = "pooled",
                 vision_layer: int = -2, freeze_vision: bool = True, latent_scale: str = "none",
                 deferred_wgrad: bool = True):
        super().__init__()
        if latent_scale not in LATENT_SCALES:
            raise ValueError(f"latent_scale must be one of {LATENT_SCALES}, got {latent_scale!r}")
        self.latent_scale = latent_scale
        self.lm, self.vision, self.projector = lm, vision, projector
        self.ids, self.n_image_tokens = ids, n_image_tokens
        self.image_tokens, self.vision_layer, self.freeze_vision = image_tokens, vision_layer, freeze_vision
        self.family = lm_family(lm.config)
        self._cache_kw = "cache" if "cache" in inspect.signature(lm.base_model.forward).parameters \
            else "past_key_values"
        self._compiled: dict = {}  # enable_compile: "multi"/"one" -> compiled per-pass LM call
        self.deferred_wgrad = deferred_wgrad  # eager multi-pass training: one in-place weight-gradient buffer
        self._wgrad_modules = weight_grad_modules(lm)
        self._decoder_layers = decoder_layers(lm)  # a plain list: not registered, the state_dict is unchanged
        install_kv_hook(lm)
        # Set by a training engine that runs several ranks (mmcoconut.train); None: one process, nothing to agree.
        self.agree_pass_count: Optional[Callable[[int], int]] = None  # MAX of a local pass count over the ranks
        self.agree_stop: Optional[Callable[[bool], bool]] = None  # generation: True once every rank is done
        self.gather_param: Optional[Callable[[nn.Parameter], None]] = None  # sharded weight read outside its module
        self.vision_half_on_cuda = True  # a frozen tower moved to CUDA runs in half precision (off for sharded)

    # ------------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_vision:
            self.vision.eval()  # frozen tower: no dropout, whatever the outer mode
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        # Frozen tower on CUDA runs in half precision (the seed's behaviour); not for sharded parameters.
        p = next(self.vision.parameters(), None)
        if (self.freeze_vision and self.vision_half_on_cuda and p is not None and p.is_cuda
                and p.dtype == torch.float32):
            self.vision.half()
        return self

    # --------------------------------------------------------------------------------------- embeddings
    def _embed(self, input_ids: torch.Tensor, sources: Optional[torch.Tensor],
               source_index: Optional[torch.Tensor]) -> torch.Tensor:
        """THE input-embedding function: row = sources[idx] if idx >= 0 else wte[id] (mmcoconut.kernels op)."""
        w = self.lm.get_input_embeddings().weight
        if self.gather_param is not None:  # a sharded table read here, outside its module's forward
            self.gather_param(w)
        if sources is None or source_index is None:
            sources = w.new_zeros((0, w.shape[1]))
            source_index = torch.full_like(input_ids, -1)
        return inject_embeddings(input_ids, w, sources.to(w.dtype), source_index)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> projected image tokens [B, n_img, D] (D: the LM's hidden size)."""
        if self.freeze_vision:
            with torch.no_grad():
                feats = encode_images(self.vision, pixel_values, self.image_tokens, self.vision_layer)
        else:
            feats = encode_images(self.vision, pixel_values, self.image_tokens, self.vision_layer)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(feats.to(proj_dtype))

    # --------------------------------------------------------------------------------------- planning
    def _resolve_plan(self, input_ids, latent_plan: Optional[LatentPlan], pixel_values, prefix=None) -> LatentPlan:
        """The host-side plan: the given one (no device reads), or made from a host copy of input_ids."""
        if latent_plan is None or prefix is not None:
            latent_plan = plan_batch(input_ids, self.ids.latent, self.ids.image, prefix=prefix)
        elif DEBUG:
            _check_plan(latent_plan, plan_batch(input_ids, self.ids.latent, self.ids.image))
        if pixel_values is None and any(latent_plan.image_counts):
            raise ValueError("batch has <image> tokens but no pixel_values")
        if pixel_values is not None and any(c != self.n_image_tokens for c in latent_plan.image_counts):
            raise ValueError(f"each row needs exactly {self.n_image_tokens} <image> tokens (image_tokens="
                             f"{self.image_tokens!r}), got per-row counts {list(latent_plan.image_counts)}")
        return latent_plan.to(input_ids.device, non_blocking=True)

    def _prepare(self, input_ids, attention_mask, pixel_values, position_ids, latent_plan: LatentPlan, layout: Layout):
        """Right-pad to layout.Tp (masked) and compute the projected image features: device ops only."""
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        ids, mask, pos, img_index = input_ids, attention_mask, position_ids, latent_plan.image_index
        pad, B = layout.Tp - latent_plan.T, ids.shape[0]
        if pad:  # right-pad (masked) so that every rank makes n + 1 calls
            ids = F.pad(ids, (0, pad), value=self.ids.pad)
            mask = F.pad(mask, (0, pad), value=0)
            pos = torch.cat([pos, pos[:, -1:].expand(B, pad)], 1)
            if img_index is not None:
                img_index = F.pad(img_index, (0, pad), value=-1)
        feats = None
        if img_index is not None:
            feats = self.image_features(pixel_values).flatten(0, 1)  # [B * n_img, D]
        return ids, mask, pos, img_index, feats

    def _fill(self, h_prev: torch.Tensor, dummy: Optional[str]) -> torch.Tensor:
        """Latent input from the previous column's last hidden state (or the dummy-latent ablation); with
        latent_scale "embedding" every non-zero fill is rescaled to the mean (detached) wte row norm."""
        if dummy is None:
            out = h_prev
        elif dummy == "zeros":
            return torch.zeros_like(h_prev)
        elif dummy == "random":
            r = torch.randn_like(h_prev)
            out = r * (h_prev.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        else:
            raise ValueError(f"dummy_latent must be one of {DUMMY_MODES}, got {dummy!r}")
        if self.latent_scale == "none":
            return out
        w = self.lm.get_input_embeddings().weight
        target = w.detach().float().norm(dim=-1).mean()
        return (out.float() * (target / out.float().norm(dim=-1, keepdim=True).clamp_min(1e-12))).to(out.dtype)

    def _lm_call(self, emb, mask, pos, kv):
        """One pass of the LM over new columns `emb` with the static cache `kv` (4-D bool mask)."""
        return self.lm.base_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False,
                                  mmc=kv).last_hidden_state

    def _lm_call_one(self, emb, mask, pos, kv):  # same, a distinct code object for the one-column compile
        return self.lm.base_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False,
                                  mmc=kv).last_hidden_state

    def enable_compile(self, mode: Optional[str] = None, backend: str = "inductor") -> None:
        """torch.compile the per-pass LM calls with fullgraph=True (a graph break is an error, not a slow path; not
        registered as a submodule: state_dict is unchanged), built at the next forward: on CUDA the one-column
        passes get mode="reduce-overhead" (CUDA graphs), their shapes fixed by padding the sequence buffers to a
        multiple of COMPILE_BUCKET; `mode` overrides both. `backend`: torch.compile's (tests trace with
        "aot_eager"). Not for ZeRO-3 (partitioned weights). `disable_compile()` returns to eager."""
        self._compiled = {"request": (mode or "auto", backend)}

    def disable_compile(self) -> None:
        self._compiled = {}

    def _lm_pass_fn(self, one: bool, device):
        if not self._compiled:
            return self._lm_call
        if "request" in self._compiled:
            mode, backend = self._compiled.pop("request")
            one_mode = ("reduce-overhead" if device.type == "cuda" else None) if mode == "auto" else mode
            multi_mode = None if mode == "auto" else mode
            self._compiled.update(
                multi=torch.compile(self._lm_call, mode=multi_mode, fullgraph=True, backend=backend),
                one=torch.compile(self._lm_call_one, mode=one_mode, fullgraph=True, backend=backend))
        return self._compiled["one" if one else "multi"]

    def _run_lm(self, embeds, attention_mask, position_ids, cache):
        kw = {self._cache_kw: cache} if cache is not None else {}
        out = self.lm.base_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=cache is not None, **kw)
        return out.last_hidden_state

    # ------------------------------------------------------------------------------------ multi-pass
    def _multipass(self, input_ids, attention_mask, pixel_values=None, position_ids=None, dummy_latent=None,
                   sync: bool = True, latent_plan: Optional[LatentPlan] = None, return_cache: bool = True) -> _State:
        """The n + 1 passes over a static KV cache (module doc, pass table). With a host `latent_plan` (Collator) no
        device data is read; the cache is returned as a transformers DynamicCache only with return_cache.

            pass   columns            input rows changed before the LM call          attention
            0      [0, start)         none (image features came with the embedding)   causal over its columns
            1..n-1 [start+i-1, +1)    latent i-1 <- last hidden state of the pass      history + itself (one column)
            n      [start+n-1, Tp)    latent n-1 <- likewise; then the rest           history + causal over its own
        """
        if dummy_latent not in DUMMY_MODES:
            raise ValueError(f"dummy_latent must be one of {DUMMY_MODES}, got {dummy_latent!r}")
        self._check_checkpointing()
        latent_plan = self._resolve_plan(input_ids, latent_plan, pixel_values)
        n_latent = latent_plan.m_local
        n = self.agree_pass_count(n_latent) if sync and self.agree_pass_count else n_latent
        layout = latent_plan.layout(n)
        if self._compiled and layout.Tp % COMPILE_BUCKET:  # bucketed buffer length: the last pass grows
            layout = _grow(layout, -layout.Tp % COMPILE_BUCKET)
        ids, mask, pos, img_index, feats = self._prepare(input_ids, attention_mask, pixel_values, position_ids,
                                                         latent_plan, layout)
        batch, length, device = ids.shape[0], layout.Tp, ids.device
        emb = self._embed(ids, feats, img_index)  # every column once: one [V, D] weight gradient per micro-batch
        pass_embs = emb.split([end - start for start, end in layout.bounds], 1)
        is_real = mask.bool()
        cols = torch.arange(length, device=device)
        causal = (cols[None, :] <= cols[:, None])[None, None] & is_real[:, None, None, :]  # [B,1,Tp,Tp] & padding
        causal_before = (cols[None, :] < cols[:, None])[None, None] & is_real[:, None, None, :]  # history only
        check_window(self.lm.config, length)
        geo = kv_geometry(self.lm.config)  # K/V heads: fewer than query heads under GQA
        kv = StaticKV(geo.n_layer, batch, geo.n_kv_heads, length, geo.head_dim, emb.dtype, device)
        # has_latent[i, b]: row b has a latent i (rows with fewer latents keep their token embedding there)
        has_latent = latent_plan.latent_counts[None, :] > torch.arange(n_latent, device=device)[:, None]
        pass_hidden, prev_last, final = [], None, len(layout.bounds) - 1
        with self._wgrad_context(final > 0):
            for pass_idx, (start, end) in enumerate(layout.bounds):
                pass_emb, width = pass_embs[pass_idx], end - start
                latent_idx = start - layout.start  # the latent at column `start` (passes >= 1)
                if pass_idx > 0 and latent_idx < n_latent:  # latent column `start` <- hidden state of start - 1
                    rows = has_latent[latent_idx][:, None, None]
                    if width > 1:
                        rows = rows & (cols[:width] == 0)[None, :, None]
                    fill = self._fill(prev_last, dummy_latent).to(pass_emb.dtype)[:, None]
                    pass_emb = torch.where(rows, fill, pass_emb)
                one_column, own = pass_idx > 0 and width == 1, None
                if pass_idx == 0:
                    pass_mask = causal[:, :, :end, :end]
                elif one_column:
                    pass_mask = causal_before[:, :, start:end]
                    own = is_real[:, start, None, None, None]
                else:
                    pass_mask = causal[:, :, start:end]
                hidden = self._lm_pass_fn(one_column, device)(pass_emb, pass_mask, pos[:, start:end], kv.open(own))
                if pass_idx < final or return_cache:
                    kv.commit(start, end)
                pass_hidden.append(hidden)
                prev_last = hidden[:, -1]
        hidden = (torch.cat(pass_hidden, 1) if len(pass_hidden) > 1 else pass_hidden[0])[:, :latent_plan.T]
        cache = kv.to_dynamic_cache(self.lm.config) if return_cache else None
        return _State(hidden, mask, pos[:, :latent_plan.T], cache, len(layout.bounds))

    def _wgrad_context(self, multi: bool):
        """Deferred projection weight gradients (wgrad.py) for a multi-pass forward that will be back-propagated;
        not under torch.compile (enable_compile) nor gradient checkpointing (a recomputed layer must run the
        forward it first ran). An engine with sharded weights turns `deferred_wgrad` off."""
        on = multi and self.deferred_wgrad and torch.is_grad_enabled() and not self._compiled \
            and not self.gradient_checkpointing
        return deferred_weight_grads(self._wgrad_modules) if on else contextlib.nullcontext()

    # ------------------------------------------------------------------------ gradient checkpointing
    def set_gradient_checkpointing(self, on: bool = True) -> None:
        """Checkpoint each decoder-layer call of every pass (families.set_checkpointing: non-reentrant; kept per
        layer and pass: its input). Turns deferred weight gradients off while on."""
        set_checkpointing(self._decoder_layers, on)

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the LM's decoder layers checkpoint (ours or set through HF's API)."""
        return any(layer.gradient_checkpointing for layer in self._decoder_layers)

    def _check_checkpointing(self) -> None:
        if self.training and torch.is_grad_enabled() and self.gradient_checkpointing:
            refuse_reentrant(self._decoder_layers)

    def _output(self, hidden, labels, n_passes, return_logits=True, label_index=None) -> MMCoconutOutput:
        """Loss on the labelled positions only (loss.py; label_index from the plan); [B, T, V] logits on request."""
        head = self.lm.get_output_embeddings()
        loss = None if labels is None else labelled_cross_entropy(hidden, labels, head, label_index, check=DEBUG)
        return MMCoconutOutput(loss=loss, logits=head(hidden) if return_logits else None, n_passes=n_passes)

    def forward(self, input_ids, attention_mask, labels=None, pixel_values=None, position_ids=None,
                dummy_latent: Optional[str] = None, latent_plan: Optional[LatentPlan] = None,
                return_logits: bool = True, **unused) -> MMCoconutOutput:
        """KV-cached multi-pass forward; loss = token CE over labels (HF shift, -100 ignored), mean over tokens.
        latent_plan (from the Collator): the host-side pass layout; with it the forward reads no device data.
        return_logits=False (training): no [B, T, V] logits at all, the loss projects the labelled positions only."""
        st = self._multipass(input_ids, attention_mask, pixel_values, position_ids, dummy_latent,
                             latent_plan=latent_plan, return_cache=False)
        return self._output(st.hidden, labels, st.n_passes, return_logits,
                            getattr(latent_plan, "label_index", None))

    def naive_forward(self, input_ids, attention_mask, labels=None, pixel_values=None, position_ids=None,
                      dummy_latent: Optional[str] = None, special_prefix: Optional[int] = None,
                      return_logits: bool = True, **unused) -> MMCoconutOutput:
        """Reference without a cache: n + 1 full-sequence passes, pass k fills latents 0..k-1 and reads the hidden
        state that feeds latent k. Same outputs as `forward` (local n; no cross-rank sync). special_prefix: only
        the first special_prefix columns hold <image>/<latent> tokens (generated tokens are plain)."""
        if dummy_latent not in DUMMY_MODES:
            raise ValueError(f"dummy_latent must be one of {DUMMY_MODES}, got {dummy_latent!r}")
        latent_plan = self._resolve_plan(input_ids, None, pixel_values, prefix=special_prefix or input_ids.shape[1])
        n = latent_plan.m_local
        layout = latent_plan.layout(n)
        ids, mask, pos, img_index, feats = self._prepare(input_ids, attention_mask, pixel_values, position_ids,
                                                         latent_plan, layout)
        batch, start = ids.shape[0], layout.start
        cols = torch.arange(layout.Tp, device=ids.device)
        first, counts = latent_plan.first_latent, latent_plan.latent_counts[:, None]
        is_latent = (cols >= first) & (cols < first + counts)  # [B, Tp]
        base_sources = [feats] if feats is not None else []
        base_index = img_index if img_index is not None else torch.full_like(ids, -1)
        offset = sum(src.shape[0] for src in base_sources)
        rows = torch.arange(batch, device=ids.device)
        fills = []  # fills[i]: [B, D] input of latent i (the hidden state read in pass i)
        for pass_idx in range(n + 1):
            index = base_index.clone()
            for latent_idx in range(pass_idx):  # latent i <- fills[i] (source row offset + i * B + b)
                col = start + latent_idx
                index[:, col] = torch.where(is_latent[:, col], offset + latent_idx * batch + rows, index[:, col])
            sources = base_sources + fills
            emb = self._embed(ids, torch.cat(sources) if sources else None, index if sources else None)
            hidden = self._run_lm(emb, mask, pos, None)
            if pass_idx < n:
                fills.append(self._fill(hidden[:, start + pass_idx - 1], dummy_latent))
        return self._output(hidden[:, :latent_plan.T], labels, n + 1, return_logits)

    # ------------------------------------------------------------------------------------ generation
    def generate(self, input_ids, attention_mask, pixel_values=None, position_ids=None, max_new_tokens: int = 64,
                 dummy_latent: Optional[str] = None) -> list[list[int]]:
        """Greedy KV-cached generation (see mmcoconut.modeling.generate); new tokens per row, EOS excluded."""
        from .generate import generate
        return generate(self, input_ids, attention_mask, pixel_values, position_ids=position_ids,
                        max_new_tokens=max_new_tokens, dummy_latent=dummy_latent)


def _grow(lay: Layout, extra: int) -> Layout:
    """The same layout with `extra` more (masked) columns at the end (the last pass covers them)."""
    Tp = lay.Tp + extra
    return Layout(n=lay.n, start=lay.start, pad=lay.pad + extra, Tp=Tp,
                  bounds=lay.bounds[:-1] + ((lay.bounds[-1][0], Tp),))


def _check_plan(given: LatentPlan, actual: LatentPlan) -> None:
    """Debug mode: a latent_plan must describe the batch's input_ids (e.g. not be left over from another batch)."""
    same = (given.T, given.first_latent, given.m_local, tuple(given.image_counts)) == \
        (actual.T, actual.first_latent, actual.m_local, tuple(actual.image_counts)) \
        and torch.equal(given.latent_counts.cpu(), actual.latent_counts) \
        and ((given.image_index is None) == (actual.image_index is None)) \
        and (given.image_index is None or torch.equal(given.image_index.cpu(), actual.image_index))
    if not same:
        raise ValueError("latent_plan does not match input_ids (a plan from another batch, or input_ids changed "
                         "after collation); drop the latent_plan key or re-collate")
