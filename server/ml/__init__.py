"""Models: loading (`loader`), GPT-2 generation (`generator`), sentiment (`classifier`), stand-ins (`offline`)."""

import torch
from transformers.utils import logging as transformers_logging

# The server's log has one format (server/core/logging.py): transformers' lines go to the root logger instead of
# its own stderr handler, and its "Loading weights" progress bars, noise in a log at every start, are off.
transformers_logging.disable_default_handler()
transformers_logging.enable_propagation()
transformers_logging.disable_progress_bar()


def configure_threads(num_threads: int) -> None:
    """Intra-op threads of every model call; call it on the thread that runs them (server/runtime.py: torch_thread)."""
    torch.set_num_threads(num_threads)
