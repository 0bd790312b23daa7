import torch

# Tiny models: one thread is fastest, and it keeps the suite from fighting other jobs for the 2 cores.
torch.set_num_threads(1)
