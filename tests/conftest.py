import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# One intra-op thread: on 2 cores a second busy process (the Neo4j JVM, a writer thread) makes
# torch's default pool thrash (measured: 19 us -> 2.8 ms for one elementwise op).
torch.set_num_threads(1)
