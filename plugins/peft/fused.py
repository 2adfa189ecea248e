"""The training forward of a LoRA adapter on a Llama-family decoder (Granite, Llama), fused, for CPUs with bfloat16.

On a CPU a small decoder's training step is bound by passes over memory and by
per-operator cost as much as by arithmetic. transformers' forward, with peft's
adapters, runs q, k and v (and gate and up) as separate products over the same
input, applies each norm's weight and Granite's multipliers as passes of their
own, and adds each adapter's update with three more operators; autograd then
adds a zero-filled copy of the whole tensor for every slice taken. While an
adapter trains, every base weight is constant, so this forward, used for the
training steps only:

* runs the frozen weights that read the same input as one product (``q|k|v``,
  ``gate|up``), with each norm's weight and Granite's residual and logits
  multipliers folded into them once, so a norm is one normalisation and
  nothing else (its backward written out: four passes);
* runs them on bfloat16 operands with float32 accumulation (about twice the
  float32 rate on AVX512-BF16), the frozen weights held in a bfloat16 copy
  (half the size of the float32 model). What trains (the adapters' A and B),
  the norms, rotary embedding, attention, loss and optimizer stay in float32;
* computes the adapters that read the same input with one product for their A
  matrices, each B added into its own member's columns of the frozen product
  by the operator that multiplies it;
* attends example by example, in the per-example rows of :mod:`.attention`:
  ``q|k|v`` gathered into them once per layer, the rotary embedding applied
  there to q and k together, tensors divided by splits (whose gradient is one
  concatenation). The gathers' gradients are gathers too, not scatters into
  zeros: each token has exactly one slot that carries a gradient. Each group of
  rows takes one batched product for its scores and one for its output, the
  query heads that share a key/value head stacked into one matrix: on rows of
  about 30 tokens SDPA's CPU kernel spends most of its time on per-block matrix
  calls, and this is about 1.4x as fast, forward and backward.

On the tiny Granite (``bench/packing.py``, one thread, AVX512-BF16) the steps
are about 1.4x as fast as transformers' forward in float32. The parameters
that train are the peft model's own, so the optimizer, checkpoints, resume and
the saved adapter are those of the model; evaluation and generation use the
model's own forward. A model or adapter this forward does not cover (another
architecture, biases, adapter dropout, DoRA, an adapter outside the seven
projections) trains through transformers' forward instead, and
:func:`training_forward` says why. ``tests/test_fused.py`` holds this forward,
run in float32, to the model's own (logits and adapter gradients, Granite's
multipliers and Llama), and in bfloat16 holds a packed example's loss to the
same value whatever is packed beside it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .attention import Segments

__all__ = ["FusedDecoder", "bf16_native", "fused_decoder", "training_forward"]

_MODEL_TYPES = ("granite", "llama")
_ATTENTION = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj")
_PROJECTIONS = (*_ATTENTION, "o_proj", *_MLP, "down_proj")


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` is a CPU with bfloat16 dot-product instructions (AVX512-BF16 or AMX), where bfloat16
    products run faster than float32 ones; emulated, they would not."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


def training_forward(model: Any, device: torch.device, precision: str) -> tuple[Any, str]:
    """What the training steps call for a prepared (peft) ``model`` and a description of it for the log and record.

    ``precision`` ``auto``: the fused forward with bfloat16 frozen products on a
    CPU with native bfloat16, where the model is covered; ``fp32``, or anything
    not covered: ``model`` itself, its own forward.
    """
    if precision == "fp32":
        return model, f"transformers' forward, {_dtype_name(model)} (precision: fp32)"
    if device.type != "cpu":
        return model, f"transformers' forward, {_dtype_name(model)}"
    if not bf16_native(device):
        return model, f"transformers' forward, {_dtype_name(model)} (this CPU has no bfloat16 dot-product instructions)"
    fused = fused_decoder(model, torch.bfloat16)
    if isinstance(fused, str):
        return model, f"transformers' forward, {_dtype_name(model)} ({fused})"
    return fused, "fused LoRA decoder, frozen products in bfloat16"


def _dtype_name(model: Any) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


class _Adapter(NamedTuple):
    """One LoRA module inside a projection group: its weights and scaling."""

    a: torch.nn.Linear
    b: torch.nn.Linear
    scaling: float


class _Group(NamedTuple):
    """Projections reading the same input, as one frozen product (plus their adapters)."""

    weight: torch.Tensor
    """``(outputs, inputs)``: the members' frozen weights stacked, folds applied, in the compute dtype."""
    widths: tuple[int, ...]
    """The output columns in pieces: each adapted member one piece, the members between them one piece."""
    pieces: tuple[_Adapter | None, ...]
    """Each piece's adapter, or ``None``."""
    inputs_scale: torch.Tensor | None
    """The norm weight folded into ``weight`` (float32), applied to the adapters' A matrices at each step."""
    outputs_scale: float
    """The residual multiplier folded into ``weight``, applied to the adapters' B matrices at each step."""

    @property
    def adapters(self) -> list[_Adapter]:
        return [piece for piece in self.pieces if piece is not None]


class _Layer(NamedTuple):
    qkv: _Group
    o: _Group
    gate_up: _Group
    down: _Group
    eps_attention: float
    eps_mlp: float


class _Frozen(torch.autograd.Function):
    """``x @ weight.T`` for a constant ``weight``: operands in the weight's dtype, the result in ``x``'s; the
    gradient goes to ``x`` only (the weight does not train, and its product is not kept for it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x.to(weight.dtype), weight).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return (grad.to(weight.dtype) @ weight).to(grad.dtype), None


class _Rows(torch.autograd.Function):
    """``x[index]`` whose gradient is ``grad[back]`` with rows ``zero`` cleared: a gather and not a zero-filled,
    accumulating scatter, for an ``index`` whose every row of ``x`` has exactly one slot that carries a gradient
    (``back``: that slot) and whose other slots (padding) carry none (or are cleared: ``zero``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, back: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(back, zero)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        back, zero = ctx.saved_tensors
        out = grad.index_select(0, back)
        if zero is not None and zero.numel():
            out.index_fill_(0, zero, 0.0)
        return out, None, None, None


class _RMSNorm(torch.autograd.Function):
    """``x / sqrt(mean(x**2) + eps)`` over the last dimension (no weight: it is folded into what reads it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd)
        return x * rstd

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, rstd = ctx.saved_tensors
        coef = (grad * x).mean(-1, keepdim=True) * rstd.pow(3)
        return torch.addcmul(grad * rstd, x, coef, value=-1.0), None


class _Output(NamedTuple):
    logits: torch.Tensor


class _Batch(NamedTuple):
    """What every layer's attention reads of a packed batch, worked out once per forward."""

    segments: Segments
    slots: torch.Tensor
    """Each slot's token (the groups' rows laid end to end); a padding slot reads token 0."""
    padding: torch.Tensor
    """The padding slots."""
    cos: torch.Tensor
    """``(slots, 1, head_dim)``: the rotary cosine at each slot's position."""
    sin: torch.Tensor
    """The same for the sine, its first half negated: ``rotate_half(x) * sin == cat(x2, x1) * sin`` here."""
    masks: tuple[torch.Tensor, ...]
    """Per group, the causal mask of its ``(tokens * shared query heads, tokens)`` scores."""


class FusedDecoder(torch.nn.Module):
    """A peft-wrapped Llama-family model's training forward (see the module's text); built by :func:`fused_decoder`.

    Called as the model is in the training loop (``input_ids``, ``position_ids``,
    ``logits_to_keep``, ``packed_segments``, ``use_cache=False``), it returns an
    object whose ``logits`` are the float32 logits of the kept positions. Its
    parameters are the adapters' (the model's own tensors), so a
    ``DistributedDataParallel`` wrapping it synchronises their gradients.
    """

    def __init__(self, model: Any, dtype: torch.dtype) -> None:
        super().__init__()
        causal = model.get_base_model()
        core, config = causal.model, causal.config
        self.adapters = torch.nn.ModuleList()  # registered, so parameters() are the adapters' A and B
        self.rotary = core.rotary_emb
        self.embedding = core.embed_tokens.weight.detach()  # a plain tensor: not a parameter of this module
        self.embedding_multiplier = float(getattr(config, "embedding_multiplier", 1.0))
        self.eps_final = float(core.norm.variance_epsilon)
        attention = core.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.scale = float(attention.scaling)
        with torch.no_grad():
            self.layers = [self._layer(layer, dtype) for layer in core.layers]
            head = causal.lm_head.weight.float() * core.norm.weight.float() / float(getattr(config, "logits_scaling", 1.0))
            self.head = head.to(dtype)

    def _layer(self, layer: Any, dtype: torch.dtype) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        residual = float(getattr(layer, "residual_multiplier", 1.0))
        return _Layer(
            qkv=self._group([getattr(attention, n) for n in _ATTENTION], layer.input_layernorm.weight, 1.0, dtype),
            o=self._group([attention.o_proj], None, residual, dtype),
            gate_up=self._group([getattr(mlp, n) for n in _MLP], layer.post_attention_layernorm.weight, 1.0, dtype),
            down=self._group([mlp.down_proj], None, residual, dtype),
            eps_attention=float(layer.input_layernorm.variance_epsilon),
            eps_mlp=float(layer.post_attention_layernorm.variance_epsilon),
        )

    def _group(self, members: list[Any], norm: torch.Tensor | None, residual: float, dtype: torch.dtype) -> _Group:
        weights: list[torch.Tensor] = []
        widths: list[int] = []
        pieces: list[_Adapter | None] = []
        for module in members:
            base = _base(module)
            weights.append(base.weight.float())
            if base is not module:  # a LoRA module around the frozen Linear: a piece of its own
                (name,) = _active(module)  # the one, as _uncovered checked
                a, b = module.lora_A[name], module.lora_B[name]
                self.adapters.extend([a, b])
                widths.append(base.out_features)
                pieces.append(_Adapter(a, b, float(module.scaling[name])))
            elif pieces and pieces[-1] is None:  # beside an unadapted member: one piece together
                widths[-1] += base.out_features
            else:
                widths.append(base.out_features)
                pieces.append(None)
        weight = torch.cat(weights) * residual
        scale = None if norm is None else norm.detach().float()
        if scale is not None:
            weight = weight * scale
        return _Group(weight.to(dtype), tuple(widths), tuple(pieces), scale, residual)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: Any = None, use_cache: bool = False,
        logits_to_keep: torch.Tensor | int = 0, packed_segments: Segments | None = None, **_: Any,
    ) -> _Output:  # fmt: skip
        if attention_mask is not None or use_cache or packed_segments is None:
            raise ValueError("the fused decoder trains on packed batches only: packed_segments, no attention mask, no cache")
        blocks, seq_len = input_ids.shape
        h = F.embedding(input_ids.reshape(-1), self.embedding)
        if self.embedding_multiplier != 1.0:
            h = h * self.embedding_multiplier
        batch = self._batch(h, position_ids, packed_segments)
        for layer in self.layers:
            x = _RMSNorm.apply(h, layer.eps_attention)
            att = self._attention(_project(layer.qkv, x), batch)
            h = h + _project(layer.o, att)
            x = _RMSNorm.apply(h, layer.eps_mlp)
            gate, up = _project(layer.gate_up, x).chunk(2, dim=-1)
            h = h + _project(layer.down, F.silu(gate) * up)
        if isinstance(logits_to_keep, torch.Tensor):
            h = h[logits_to_keep.reshape(-1)]
        elif logits_to_keep:
            h = h.view(blocks, seq_len, -1)[:, -logits_to_keep:].reshape(-1, h.shape[-1])
        return _Output(_Frozen.apply(_RMSNorm.apply(h, self.eps_final), self.head))

    def _batch(self, h: torch.Tensor, position_ids: torch.Tensor, segments: Segments) -> _Batch:
        slots = torch.cat([rows.reshape(-1) for rows in segments.rows])
        padding = torch.ones(len(slots), dtype=torch.bool, device=slots.device)
        padding[segments.scatter] = False
        cos, sin = self.rotary(h, position_ids)
        half, shared = self.head_dim // 2, self.heads // self.kv_heads
        cos = cos.reshape(-1, 1, self.head_dim)[slots]
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): one cat of x, not two slices, a negation and a cat.
        sin = sin.reshape(-1, 1, self.head_dim)[slots]
        sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)
        masks = tuple(
            h.new_full((longest, longest), float("-inf")).triu(1).repeat_interleave(shared, dim=0)
            for longest in (rows.shape[1] for rows in segments.rows)
        )
        return _Batch(segments, slots, padding.nonzero().squeeze(1), cos, sin, masks)

    def _attention(self, qkv: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """Causal attention example by example: ``qkv`` ``(tokens, q|k|v)`` in, ``(tokens, heads * head_dim)`` out.

        A padding slot (past its example's end) comes after every real query of its row, so the causal mask
        hides it from them; its own query's output is dropped."""
        heads, kv, dim = self.heads, self.kv_heads, self.head_dim
        # Every example's tokens as a row of its group, groups end to end. A padding slot's q, k and v get no
        # gradient (its query's output is dropped, and only padding queries see its key), so each token's gradient
        # is its own slot's: gathered back, not scattered into zeros.
        rows = _Rows.apply(qkv, batch.slots, batch.segments.scatter, None)
        # Splits, not slices: a split's gradient is one concatenation, a slice's a zero-filled copy of the whole.
        qk, v = rows.split([(heads + kv) * dim, kv * dim], dim=1)
        qk = qk.reshape(-1, heads + kv, dim)
        first, second = qk.split(dim // 2, dim=-1)
        qk = qk * batch.cos + torch.cat((second, first), -1) * batch.sin
        q, k = qk.split([heads, kv], dim=1)
        groups = batch.segments.rows
        sizes = [group.numel() for group in groups]
        shared = heads // kv  # query heads per key/value head: they share one batched product
        outs = []
        for group, mask, q_g, k_g, v_g in zip(groups, batch.masks, q.split(sizes), k.split(sizes), v.split(sizes), strict=True):
            n, longest = group.shape
            # (rows * kv heads, tokens * shared query heads, dim): row t * shared + j is token t's j-th query head.
            q_g = q_g.reshape(n, longest, kv, shared, dim).transpose(1, 2).reshape(n * kv, longest * shared, dim)
            k_g = k_g.reshape(n, longest, kv, dim).transpose(1, 2).reshape(n * kv, longest, dim)
            v_g = v_g.reshape(n, longest, kv, dim).transpose(1, 2).reshape(n * kv, longest, dim)
            scores = torch.baddbmm(mask.expand(n * kv, -1, -1), q_g, k_g.transpose(1, 2), alpha=self.scale)
            out = torch.bmm(scores.softmax(-1), v_g)
            outs.append(out.view(n, kv, longest, shared, dim).transpose(1, 2).reshape(n * longest, heads * dim))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return _Rows.apply(out, batch.segments.scatter, batch.slots, batch.padding)  # padding outputs dropped: no gradient


def _project(group: _Group, x: torch.Tensor) -> torch.Tensor:
    """The group's frozen product of ``x``, plus its adapters' updates (scaled, folds applied)."""
    out = _Frozen.apply(x, group.weight)
    adapters = group.adapters
    if not adapters:
        return out
    a = torch.cat([ad.a.weight for ad in adapters])
    if group.inputs_scale is not None:
        a = a * group.inputs_scale
    xa = x @ a.t()  # every adapter's A in one product
    # Each adapter's B adds into its own member's columns: split, add, concatenate (one pass), rather than one
    # product with a block matrix that is mostly zeros.
    pieces, at = [], 0
    for piece, adapter in zip(out.split(group.widths, dim=1), group.pieces, strict=True):
        if adapter is not None:
            rank = adapter.a.weight.shape[0]
            alpha = adapter.scaling * group.outputs_scale
            piece = torch.addmm(piece, xa[:, at : at + rank], adapter.b.weight.t(), alpha=alpha)
            at += rank
        pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _base(module: Any) -> Any:
    return getattr(module, "base_layer", module)


def fused_decoder(model: Any, dtype: torch.dtype) -> FusedDecoder | str:
    """The fused training forward of a peft-wrapped ``model`` with frozen products in ``dtype``, or why it cannot be
    built (the model then trains through its own forward)."""
    reason = _uncovered(model)
    return reason if reason is not None else FusedDecoder(model, dtype)


def _uncovered(model: Any) -> str | None:
    """Why the fused forward does not cover ``model`` (a peft model with a LoRA adapter), or ``None``."""
    get_base = getattr(model, "get_base_model", None)
    if get_base is None:
        return "not a LoRA-adapted model"
    causal = get_base()
    config = causal.config
    if config.model_type not in _MODEL_TYPES:
        return f"the fused forward covers {', '.join(_MODEL_TYPES)} models, not {config.model_type!r}"
    if config.hidden_act != "silu" or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "the model's activation or projection biases differ from the Llama layout"
    if getattr(config, "attention_dropout", 0.0) or getattr(config, "pretraining_tp", 1) != 1:
        return "the model uses attention dropout or tensor-parallel pretraining slices"
    adapted = {name.rsplit(".", 1)[-1] for name, m in causal.named_modules() if hasattr(m, "lora_A")}
    if not adapted or not adapted <= set(_PROJECTIONS):
        return f"adapters on {', '.join(sorted(adapted - set(_PROJECTIONS))) or 'nothing'}: the fused forward adapts the seven projections"
    if any(p.requires_grad for n, p in causal.named_parameters() if "lora_" not in n):
        return "base weights train too"
    for layer in causal.model.layers:
        for name in _PROJECTIONS:
            reason = _adapter_uncovered(getattr(layer.self_attn if name in (*_ATTENTION, "o_proj") else layer.mlp, name))
            if reason is not None:
                return reason
    return None


def _active(module: Any) -> list[str]:
    """The active adapters of a peft LoRA module that it holds."""
    return [n for n in module.active_adapters if n in module.lora_A]


def _adapter_uncovered(module: Any) -> str | None:
    base = _base(module)
    if not isinstance(base, torch.nn.Linear) or base.bias is not None:
        return "a projection is not a plain linear layer without bias"
    if base is module:
        return None
    active = _active(module)
    if module.disable_adapters or module.merged or len(active) != 1:
        return "the adapter is disabled, merged, or one of several active"
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or module.lora_B[name].bias is not None:
        return "the adapter is a LoRA variant (DoRA, a LoRA bias)"
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return "adapter dropout is set"
    return None
