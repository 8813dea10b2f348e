"""The CPU inference path: a copy of a trained AT or NAT whose matrix products run in int8 or
bf16, for decoding (NAT, NAT + LPD, AT beam search) on a CPU.

Most of a decoding pass on a CPU is matrix products: the Transformer's linear layers, the
imitation modules' policy FFNs (eq 4) and, largest at a 32k vocabulary, the tied output
projection h·Eᵀ that gives the NAT's argmax and the AT's log p(y|x) when LPD rescores.
  int8: every nn.Linear and the output projection as Int8Linear: weights int8 with one scale
        per output unit, each input row quantized to int8 with its own scale when it arrives,
        products summed exactly in int32 (oneDNN: VNNI / AMX-int8 kernels on x86). Per-row
        scales keep a sentence's translation independent of what else is in its batch.
  bf16: weights and activations in bfloat16, products summed in fp32 (oneDNN). Fast only on
        CPUs with bf16 matrix units (AMX); elsewhere slower than fp32.
  auto: bf16 where the CPU has AMX tiles, else int8.
Softmaxes (the policies of eq 4, the output distribution) and LPD scores stay fp32. Translations
may differ from the fp32 model's where two tokens or candidates nearly tie; BENCHMARKS.md gives
the BLEU each mode costs on Multi30k.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .at import EncoderDecoder
from .config import CPU_MODES


def has_bf16_matrix_units() -> bool:
    """True on CPUs with AMX tiles (Intel Sapphire Rapids and later), where bf16 products are
    native; elsewhere torch emulates them and bf16 is slower than fp32."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def resolve_mode(mode: str) -> str:
    """"auto" -> "bf16" or "int8" for this CPU (has_bf16_matrix_units); other modes as given."""
    if mode not in CPU_MODES:
        raise ValueError(f"CPU inference mode must be one of {', '.join(CPU_MODES)}, got {mode!r}")
    if mode == "auto":
        return "bf16" if has_bf16_matrix_units() else "int8"
    return mode


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one scale per row: (q (N, K) int8, scale (N, 1)), x ≈ q·scale."""
    scale = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_min(1e-12) / 127.0   # max |x|
    return torch.round(x * scale.reciprocal()).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x·Wᵀ + b with W and each row of x in int8: y ≈ (q_x·q_Wᵀ) · s_x · s_W + b, the integer
    product exact in int32 (|q| ≤ 127, so K < 2¹⁷ inputs cannot overflow)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        q, scale = quantize_rows(weight.detach().float())          # one scale per output unit
        self.register_buffer("weight_t", q.t().contiguous())        # (K, N): the layout _int_mm takes
        self.register_buffer("weight_scale", scale.view(-1))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, scale = quantize_rows(x.reshape(-1, shape[-1]).float())
        y = torch._int_mm(q, self.weight_t).float().mul_(scale)    # in place: the output is the big tensor
        y = y.mul_(self.weight_scale) if self.bias is None else torch.addcmul(self.bias, y, self.weight_scale)
        return y.view(*shape[:-1], -1).to(x.dtype)


def quantize_int8(model: EncoderDecoder) -> EncoderDecoder:
    """Every nn.Linear of `model` (in place) and its output projection h·Eᵀ as Int8Linear."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child))
    model.output_projection = Int8Linear(model.embed.weight)
    return model


def for_cpu(model: EncoderDecoder, mode: str = "auto") -> EncoderDecoder:
    """A copy of `model` (on the CPU, in eval mode) for fast CPU decoding in `mode` (CPU_MODES);
    "off" returns `model` itself. The copy is for inference only: never train or save it."""
    mode = resolve_mode(mode)
    if mode == "off":
        return model
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("the CPU inference path takes a model on the CPU")
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    if mode == "bf16":
        return fast.to(torch.bfloat16)
    return quantize_int8(fast)
