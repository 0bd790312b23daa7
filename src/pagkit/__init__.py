"""pagkit: Perturbed-Attention Guidance and its siblings (SEG, SAG, SLG, NAG) for diffusion models, training-free."""
from .backends.custom import adapt
from .denoise import GuidedDenoiser, guide
from .methods import CFG, METHODS, NAG, PAG, SAG, SEG, SLG, GuidanceTerm
from .layers import LayerInfo, aliases, layers, resolve_layers
from .pipelines import attach
from .sample import sample

__all__ = ["CFG", "PAG", "SEG", "SAG", "SLG", "NAG", "METHODS", "GuidanceTerm", "GuidedDenoiser", "LayerInfo", "adapt",
           "aliases", "attach",
           "guide", "layers", "resolve_layers", "sample"]
__version__ = "0.1.0"
