"""Time per image of one forward of the shipped `fmnist` UNet against batch size, on one thread.

    python docs/batch_cost.py

Backs the README's note on why `pagkit eval` (250 images per shard) shows PAG at about 2.2x no
guidance: a guided step runs a doubled batch, and on this CPU the cost per row grows with the batch.
Best of 3 runs per batch size.
"""
import time

import torch

from pagkit.load import load_model

torch.set_num_threads(1)
model = load_model("fmnist")
with torch.no_grad():
    for batch in (16, 32, 64, 125, 250, 500):
        x, t = torch.randn(batch, 1, 32, 32), torch.full((batch,), 500)
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            model(x, t)
            seconds.append(time.perf_counter() - start)
        print(f"batch {batch:4d}: {1000 * min(seconds) / batch:5.2f} ms per image")
