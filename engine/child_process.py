"""What every process the engine starts does first (the engine process, tensor-parallel followers)."""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable


def prepare_child(setup: Callable[[], None] | None) -> None:
    """Ignore Ctrl-C (it reaches the whole process group; the server decides when its children
    stop), run the caller's `setup` (e.g. its log configuration), silence progress bars (the
    server's log is one JSON object per line) and use a thread lock for tqdm (its default, a
    multiprocessing semaphore, would leak: these processes exit without finalisers), no autograd."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if setup is not None:
        setup()
    import torch
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    tqdm.set_lock(threading.RLock())
    torch.set_grad_enabled(False)
