"""pagkit: Perturbed-Attention Guidance and its siblings (SEG, SAG, SLG, STG, TPG, NAG, autoguidance) for
diffusion models, training-free, with combination rules (APG, CFG-Zero*) for any of their differences."""
from .backends.custom import adapt
from .denoise import GuidedDenoiser, guide
from .methods import (APG, CFG, METHODS, NAG, PAG, RULES, SAG, SEG, SLG, STG, TPG, AutoGuidance, CFGZeroStar,
                      ContrastTerm, GuidanceTerm)
from .layers import LayerInfo, aliases, layers, resolve_layers
from .pipelines import attach
from .presets import load_preset
from .sample import sample

__all__ = ["CFG", "PAG", "SEG", "SAG", "SLG", "STG", "TPG", "NAG", "AutoGuidance", "METHODS", "APG",
           "CFGZeroStar", "RULES", "GuidanceTerm", "ContrastTerm",
           "GuidedDenoiser", "LayerInfo", "adapt", "aliases", "attach",
           "guide", "layers", "load_preset", "resolve_layers", "sample"]
__version__ = "0.1.0"
