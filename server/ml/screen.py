"""A greedy row's next token without the float32 LM head's full product: an int8 screen, then the few candidates it
leaves computed exactly (`ScreenedHead`).

Why: a lone request's decoding step reads every weight once, and GPT-2's LM head is a third of them (38.6 M of 124 M
floats, 154 MB): on an AMD EPYC Zen 4 its one-row product took 5.0 to 5.5 ms of a 21 ms fp32 step, where the same
product on int8 weights (fbgemm) took 0.6 to 0.8. A greedy row needs the largest logit, not all of them.

How, for one row `x` (the hidden state after the final norm) and the head's float32 weights `W` (one row `w_v` per
token):

1. `approx = Ŵ x̂`, one int8 product: `Ŵ` is `W` quantized per row once at load (`ŵ_v`, 8 bits), `x̂` is `x`
   quantized twice on one grid of our own: `x` itself, then its quantization residual scaled up 63 times, two rows
   of one product (the weights are read once for both), so that `x̂` is within a 126th of a step of `x`. The grid
   has 127 levels (0..126), so that no pair of products overflows the 16-bit sums of fbgemm's AVX2 and AVX-512
   kernels (126 * 128 * 2 < 2**15). The op (`quantized::linear_with_input_q_dq_qweight_dq_output_fp32`) takes that
   grid, so `x̂` is known here: `torch.quantize_per_tensor` quantizes the same way (tests/ml/test_screen.py checks
   that the op computes `Ŵ x̂` to float rounding).
2. A bound `B` on `|approx_v - x·w_v|` for every token, from exact quantities (Cauchy-Schwarz on each term of
   `x·w_v - x̂·ŵ_v = (x - x̂)·w_v + x̂·(w_v - ŵ_v)`): `||x - x̂||·max||w_v|| + ||x̂||·max||w_v - ŵ_v||`, plus the
   float32 rounding of the op's outputs and of their sum.
3. The candidates: every token with `approx_v >= max(approx) - 2B - 2R`, where `R = d·2⁻²³·||x||·max||w_v||`
   bounds how far any float32 sum of a `d`-term dot product lies from the real one. Any other token's real logit
   is then more than `2R` below that of the token with the largest `approx`, so its float32 logit, however summed,
   is below that token's, a candidate's.
4. The candidates' logits in float32 (their rows of `W` gathered, one matrix-vector product), the first largest.

So the pick is the argmax of the float32 logits, as exact as the full head's: where two candidates' logits lie
within float32 rounding of each other, the pick can differ from the full product's as any two float32 kernels'
summation orders can. On the random GPT-2-124M of the bench the screen left a median of 15 candidates of 50257 (at
most 77, over 595 positions of 64 prompts; 21 and 99 with four of the 768 features made 8 times larger) and picked
the full head's token at every one; with `x` quantized once, it had left 238 (990). Where it leaves more than an
eighth of the vocabulary (a hidden state whose logits are all alike) the full head computes the row instead.

For one row only: at 32 rows the head is a matrix product whose arithmetic, not its reads, sets its time (13.5 ms
on the Zen 4) and the screen's candidates grow with the rows (the op's one grid covers them all); it measured 1.6x
slower there. And only where it measured faster than the full head at load (`screened_head`).
"""

from collections.abc import Callable
from typing import Protocol, cast

import torch
from torch import nn

from server.ml.kernels import seconds
from server.ml.precision import quantization_warnings_silenced, quantized_engine

# The input's levels: -63..63 steps around its zero point, 0..126 in all (see step 1 of the module's docstring).
INPUT_LEVELS = 126
ZERO_POINT = INPUT_LEVELS // 2
# What the quantization's residual (half a step at most) is scaled by to be quantized on the same grid again.
GAIN = INPUT_LEVELS / 2
SCREENED_OP = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default
# The screen gives up (the full head computes the row) beyond this share of the vocabulary as candidates.
MOST_CANDIDATES = 1 / 8
# float32's unit roundoff: the relative error of one float32 operation.
UNIT_ROUNDING = 2.0**-24


class ScreenedHead:
    """The greedy pick of an LM head without a bias (`head(x) = W x`, `weight` its float32 `W`) for one row."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor):
        self.head = head
        self.weight = weight.detach()
        vocabulary, width = self.weight.shape
        scales = (self.weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        with quantization_warnings_silenced(), quantized_engine("fbgemm"):
            quantized = torch.quantize_per_channel(
                self.weight, scales.double(), torch.zeros(vocabulary, dtype=torch.long), 0, torch.qint8
            )
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        row_norms = self.weight.double().norm(dim=1)
        error_norms = (self.weight.double() - quantized.dequantize().double()).norm(dim=1)
        # 1.001: the norms below are float32 sums too; a looser bound only leaves more candidates.
        self.weight_norm = float(row_norms.max()) * 1.001
        self.error_norm = float(error_norms.max()) * 1.001
        # Any float32 dot product of `width` terms is within width * 2**-23 * ||x|| * ||w_v|| of the real one.
        self.dot_rounding = width * 2 * UNIT_ROUNDING
        self.width = width
        self.most = max(1, int(vocabulary * MOST_CANDIDATES))

    def screen(self, hidden: torch.Tensor) -> tuple[torch.Tensor, float, float] | None:
        """`approx` (every token's int8 logit for `hidden`, [1, width]), the bound `B` on how far each lies from the
        real logit, and `R`, how far a float32 logit may lie from the real one (see the module's docstring); None where
        `hidden` is zero: nothing to scale."""
        peak = float(hidden.abs().max())
        if peak == 0.0:
            return None
        scale = 2 * peak / INPUT_LEVELS
        # Already on the grid, so the op quantizes it to exactly these values.
        first = torch.quantize_per_tensor(hidden, scale, ZERO_POINT, torch.quint8).dequantize()
        residual = hidden - first
        both = SCREENED_OP(torch.cat([first, residual * GAIN]), scale, ZERO_POINT, self.packed)
        approx = both[0] + both[1] / GAIN
        second = torch.quantize_per_tensor(residual * GAIN, scale, ZERO_POINT, torch.quint8).dequantize() / GAIN
        # The op may round a value within float rounding of a half step the other way than `quantize_per_tensor`:
        # off by half a step either way, so the error's norm moves by float rounding only (the margins), as does
        # the residual's own subtraction.
        residual_norm = float(residual.norm())
        input_error = (
            float((residual - second).norm()) * 1.001
            + 1e-3 * scale / GAIN * self.width**0.5
            + 2 * UNIT_ROUNDING * residual_norm
        )
        norm = float(hidden.norm())
        bound = (
            input_error * self.weight_norm
            + (norm + input_error) * self.error_norm
            + 8 * UNIT_ROUNDING * (norm + 2 * residual_norm + input_error) * (self.weight_norm + self.error_norm)
        )
        return approx, bound, self.dot_rounding * norm * self.weight_norm

    def candidates(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The tokens whose float32 logit may be the largest for `hidden` ([1, width]), ascending; None where the
        screen leaves too many (or `hidden` is zero)."""
        screened = self.screen(hidden)
        if screened is None:
            return None
        approx, bound, rounding = screened
        candidates = (approx >= approx.max() - 2 * bound - 2 * rounding).nonzero().squeeze(1)
        return candidates if len(candidates) <= self.most else None

    def pick(self, hidden: torch.Tensor) -> torch.Tensor:
        """The greedy token for `hidden` ([1, width] float32), as a one-element tensor."""
        candidates = self.candidates(hidden)
        if candidates is None:
            return self.head(hidden).max(dim=-1).indices
        logits = self.weight[candidates] @ hidden[0]
        return candidates[logits.max(dim=0).indices].unsqueeze(0)


class LanguageModel(Protocol):
    """What the screen needs of a model: transformers' accessors for its embeddings."""

    def get_input_embeddings(self) -> nn.Module: ...

    def get_output_embeddings(self) -> nn.Module: ...


def screened_head(model: LanguageModel, hidden: torch.Tensor) -> tuple[ScreenedHead | None, str]:
    """The screen for `model`'s LM head where it computes one row faster than the head itself, timed here on
    `hidden` (a real one-row hidden state: the candidates, and so the time, depend on it), and what was decided.

    Only for a float32 head without a bias on a torch with fbgemm, whose matrix is its own weight or, tied (GPT-2's,
    whose head may be repacked for oneDNN), the input embedding's: checked on `hidden`, to float32 rounding. The
    caller runs it where the decoding step is the lean one (a GPT-2 on the CPU, server/ml/decode_step.py)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        # `nn.Module` types the attributes it does not know as a tensor or a module: an embedding's is a tensor.
        weight = cast(torch.Tensor, model.get_input_embeddings().weight)
    if getattr(head, "bias", None) is not None or weight.dtype != torch.float32 or weight.dim() != 2:
        return None, "off: the LM head is not a float32 product without a bias"
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None, "off: this torch build has no fbgemm"
    screen = ScreenedHead(head.forward, weight)
    with torch.inference_mode():
        rounding = screen.dot_rounding * float(hidden.norm()) * screen.weight_norm
        if not bool(((head(hidden) - hidden @ screen.weight.T).abs() <= rounding).all()):
            return None, "off: the LM head's matrix is neither its weight nor the input embedding's"
        # One copy each: the full head (154 MB for GPT-2) is read from memory anyway; the screen's int8 copy, a
        # quarter of it, about as much as a large cache holds.
        full = seconds([lambda x: head(x).max(dim=-1)], hidden)
        screened = seconds([screen.pick], hidden)
    timed = f"one row: {screened * 1e3:.2f} ms screened against {full * 1e3:.2f} ms for the full head"
    if screened < full:
        return screen, f"on for greedy one-row steps ({timed})"
    return None, f"off ({timed})"
