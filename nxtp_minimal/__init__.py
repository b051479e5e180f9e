"""nxtp-minimal: Object Recognition as Next Token Prediction (Yue et al., CVPR 2024) in plain PyTorch."""

from .config import LanguageConfig, NXTPConfig, VisionConfig, released
from .model import NXTP
from .preprocess import load_image, preprocess
from .tokenizer import Tokenizer
from .weights.format import load, load_demo, save

__all__ = [
    "NXTP", "NXTPConfig", "VisionConfig", "LanguageConfig", "Tokenizer",
    "released", "load", "load_demo", "save", "preprocess", "load_image",
]
