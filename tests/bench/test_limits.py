import torch

from server.bench.limits import lone_bytes
from server.ml.screen import ScreenedHead


def test_a_lone_request_reads_every_weight_per_token_but_the_screened_heads_int8_copy():
    weight = torch.randn(1000, 64)
    screen = ScreenedHead(lambda x: x @ weight.T, weight)
    weights = 10_000 + weight.numel()  # the rest of the model and its head
    assert lone_bytes(None, weights, 16, "fp32") == 16 * weights * 4
    assert lone_bytes(None, weights, 16, "int8") == 16 * weights
    # Every pick, the prefill's and the 15 decoding steps', reads the head's int8 copy instead (a byte a weight).
    assert lone_bytes(screen, weights, 16, "fp32") == 16 * 10_000 * 4 + weight.numel() * 16
