import itertools

import pytest
import torch
from torch import nn

from server.ml import screen as screen_module
from server.ml.decoding import GenerationParams, Sequence
from server.ml.device import Placement
from server.ml.generator import TextGenerator
from server.ml.loader import locate
from server.ml.screen import GAIN, INPUT_LEVELS, SCREENED_OP, ZERO_POINT, ScreenedHead, screened_head
from tests.ml.conftest import LONG, MIDDLE, SHORT

WIDTH = 768


def weights(vocabulary: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(vocabulary, WIDTH, generator=torch.Generator().manual_seed(seed)) * 0.02


def hidden_states(count: int, seed: int = 1) -> torch.Tensor:
    """Like a final layer norm's outputs: unit spread, with a few large features (GPT-2 has some)."""
    hidden = torch.randn(count, WIDTH, generator=torch.Generator().manual_seed(seed))
    hidden[:, :4] *= 8
    return hidden


def screen_of(weight: torch.Tensor) -> tuple[ScreenedHead, list[int]]:
    """The screen over `weight`, and a list that counts its calls of the full head."""
    calls: list[int] = []

    def head(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x @ weight.T

    return ScreenedHead(head, weight), calls


def test_the_op_multiplies_the_int8_weights_by_the_input_as_quantize_per_tensor_quantizes_it():
    """The bound rests on knowing the op's quantized input: it must be `quantize_per_tensor`'s on our grid."""
    weight = weights(512)
    screen, _ = screen_of(weight)
    dequantized = torch.ops.quantized.linear_unpack(screen.packed)[0].dequantize().double()
    for x in hidden_states(8):
        x = x[None]
        scale = 2 * float(x.abs().max()) / INPUT_LEVELS
        first = torch.quantize_per_tensor(x, scale, ZERO_POINT, torch.quint8).dequantize()
        rows = torch.cat([first, (x - first) * GAIN])  # the screen's two rows
        seen = torch.quantize_per_tensor(rows, scale, ZERO_POINT, torch.quint8)
        assert int(seen.int_repr().max()) <= 126  # no 16-bit overflow in fbgemm's AVX2 sums
        assert torch.equal(seen.dequantize()[0], first[0])  # the first row is on the grid already
        expected = seen.dequantize().double() @ dequantized.T
        got = SCREENED_OP(rows, scale, ZERO_POINT, screen.packed).double()
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_the_bound_holds_for_every_token():
    weight = weights(4096)
    screen, _ = screen_of(weight)
    exact = weight.double()
    for x in hidden_states(32):
        screened = screen.screen(x[None])
        assert screened is not None
        approx, bound, _ = screened
        assert float((approx.double() - exact @ x.double()).abs().max()) <= bound


def near_ties(pairs: int, gap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights whose rows come in pairs nearly alike, and hidden states whose two best tokens are such a pair, their
    logits `gap` apart or less: far below what int8 can tell apart."""
    base = weights(64, seed=2)
    generator = torch.Generator().manual_seed(3)
    rows, states = [], []
    for pair in range(pairs):
        x = hidden_states(1, seed=10 + pair)[0]
        top = x / x.norm() * 0.6  # a logit well above every random row's
        nudge = torch.randn(WIDTH, generator=generator)
        nudge -= (nudge @ x) / (x @ x) * x  # orthogonal to x: the pair's logits stay tied ...
        # The pair's logits `gap / 4` to `gap / 2` apart, either way: beyond float32's rounding, below int8's.
        apart = gap * (0.25 + float(torch.rand(1, generator=generator)) / 4) * (1 if pair % 2 else -1)
        rows += [top, top + nudge * 1e-4 + x / (x @ x) * apart]
        states.append(x)
    return torch.cat([base, torch.stack(rows)]), torch.stack(states)  # ... but for the gap along x


def test_the_pick_is_the_float32_argmax_even_where_int8_cannot_tell_the_best_tokens_apart():
    weight, states = near_ties(pairs=40, gap=1e-3)
    screen, calls = screen_of(weight)
    int8_wrong = 0
    for x in states:
        x = x[None]
        logits = x @ weight.T
        assert int(screen.pick(x)) == int(logits.argmax())
        assert int(screen.pick(x)) == int((x.double() @ weight.double().T).argmax())
        screened = screen.screen(x)
        assert screened is not None
        int8_wrong += int(screened[0].argmax()) != int(logits.argmax())
    assert not calls  # every pick came from the candidates, none from the full head
    assert int8_wrong > 0  # the int8 product alone would have picked another token


def test_random_rows_leave_few_candidates_and_the_same_pick_as_the_full_product():
    weight = weights(8192)
    screen, calls = screen_of(weight)
    for x in hidden_states(64):
        x = x[None]
        candidates = screen.candidates(x)
        assert candidates is not None and len(candidates) < 8192 // 16
        assert int(screen.pick(x)) == int((x @ weight.T).argmax())
    assert not calls


def test_a_row_the_screen_cannot_narrow_goes_to_the_full_head():
    alike = weights(1).repeat(256, 1)  # every token's logit the same: every token a candidate
    screen, calls = screen_of(alike)
    x = hidden_states(1)
    assert screen.candidates(x) is None
    assert int(screen.pick(x)) == 0 and len(calls) == 1
    assert screen.screen(torch.zeros(1, WIDTH)) is None
    assert int(screen.pick(torch.zeros(1, WIDTH))) == 0 and len(calls) == 2


class Tied(nn.Module):
    """An LM with its head tied to its input embedding (GPT-2's) or not."""

    def __init__(self, tied: bool, bias: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(512, WIDTH)
        self.head = nn.Linear(WIDTH, 512, bias=bias)
        if tied:
            self.head.weight = self.embedding.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def timed(monkeypatch, full: float, screened: float) -> None:
    """Inject the load's two timings: the full head's, then the screen's (for every load after)."""
    times = itertools.cycle([full, screened])
    monkeypatch.setattr(screen_module, "seconds", lambda run, x: next(times))


def test_the_screen_is_kept_only_where_it_measured_faster(monkeypatch):
    x = hidden_states(1)
    timed(monkeypatch, full=5e-3, screened=1e-3)
    screen, reason = screened_head(Tied(tied=True), x)
    assert screen is not None
    assert reason == "on for greedy one-row steps (one row: 1.00 ms screened against 5.00 ms for the full head)"
    timed(monkeypatch, full=1e-3, screened=1e-3)
    screen, reason = screened_head(Tied(tied=True), x)
    assert screen is None and reason == "off (one row: 1.00 ms screened against 1.00 ms for the full head)"


def test_only_a_float32_head_without_a_bias_whose_matrix_is_known_is_screened(monkeypatch):
    x = hidden_states(1)
    timed(monkeypatch, full=5e-3, screened=1e-3)
    assert screened_head(Tied(tied=False), x)[0] is not None  # its own weight
    assert screened_head(Tied(tied=True, bias=True), x)[1] == "off: the LM head is not a float32 product without a bias"
    assert screened_head(Tied(tied=True).to(torch.bfloat16), x.bfloat16())[0] is None

    class Repacked(Tied):
        """A head that keeps no weight of its own (oneDNN's packing): the embedding's is taken, if it is the one."""

        def __init__(self, tied: bool):
            super().__init__(tied)
            product = self.head if tied else nn.Linear(WIDTH, 512, bias=False)
            self.head = nn.Sequential(product)  # no `weight`

    assert screened_head(Repacked(tied=True), x)[0] is not None
    screen, reason = screened_head(Repacked(tied=False), x)
    assert screen is None and reason == "off: the LM head's matrix is neither its weight nor the input embedding's"


@pytest.fixture
def screened_generator(standins, tmp_path, monkeypatch) -> TextGenerator:
    """The stand-in with the screen on, whatever it measures here (its tiny head is faster than any screen)."""
    timed(monkeypatch, full=5e-3, screened=1e-3)
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    return TextGenerator.load(location, str(tmp_path), "fp32", "onednn", Placement(torch.device("cpu"), torch.float32))


def counting(generator: TextGenerator) -> list[int]:
    screen = generator.decoder.screen
    assert screen is not None
    calls: list[int] = []
    pick = screen.pick
    screen.pick = lambda hidden: calls.append(1) or pick(hidden)  # type: ignore[method-assign]
    return calls


def test_a_lone_greedy_request_is_picked_by_the_screen_with_the_full_heads_tokens(screened_generator):
    generator = screened_generator
    assert generator.head_screen.startswith("on for greedy one-row steps")
    calls = counting(generator)
    params = GenerationParams(max_new_tokens=12, ignore_eos=True)
    prompts = [generator.encode(p) for p in (SHORT, MIDDLE, LONG)]
    screened = [generator.generate([prompt], params)[0].token_ids for prompt in prompts]
    assert len(calls) == 3 * 12  # every pick, the prefill's and each decoding step's
    generator.decoder.screen = None
    assert screened == [generator.generate([prompt], params)[0].token_ids for prompt in prompts]
    assert len(calls) == 3 * 12


def test_a_row_scoring_its_prompt_is_prefilled_by_the_full_head_and_its_steps_screened(screened_generator):
    """Its prompt's log-probabilities come from the prefill's hidden states over the whole prompt and the full head."""
    generator = screened_generator
    calls = counting(generator)
    [sequence] = generator.complete(
        [generator.encode(MIDDLE)], GenerationParams(max_new_tokens=6, ignore_eos=True, prompt_logprobs=True)
    )
    assert len(calls) == 5 and len(sequence.token_ids) == 6
    assert sequence.prompt_logprobs is not None and len(sequence.prompt_logprobs) == len(generator.encode(MIDDLE))


@pytest.mark.parametrize(
    "params, rows",
    [
        (GenerationParams(max_new_tokens=6, logprobs=2), 1),
        (GenerationParams(max_new_tokens=6, temperature=0.7), 1),
        (GenerationParams(max_new_tokens=6, repetition_penalty=1.3), 1),
        (GenerationParams(max_new_tokens=6), 2),
    ],
    ids=["logprobs", "sampled", "penalized", "two-rows"],
)
def test_rows_that_read_their_logits_or_share_a_step_keep_the_full_head(screened_generator, params, rows):
    generator = screened_generator
    calls = counting(generator)
    sequences = [Sequence(tuple(generator.encode(p)), params, seed=0) for p in (SHORT, MIDDLE)[:rows]]
    with torch.inference_mode():
        generator.decoder.complete(sequences)
    assert not calls
    assert all(len(s.tokens) == 6 or s.finish_reason == "stop" for s in sequences)
    if params.logprobs:
        assert len(sequences[0].logprobs) == len(sequences[0].tokens)
