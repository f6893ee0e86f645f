"""Models: loading (`loader`), GPT-2 generation (`generator`), sentiment (`classifier`), stand-ins (`offline`)."""

import torch


def configure_threads(num_threads: int) -> None:
    """Intra-op threads for every model call; the calls themselves run one per model in the executor."""
    torch.set_num_threads(num_threads)
