"""Model configuration: the vision encoder, the truncated decoder, and the released preset."""

from dataclasses import asdict, dataclass, field
from typing import Optional

SPECIAL_TOKENS = ("<|image|>", "<|empty|>")
# The object prompts of the official prompt augmentation (kaiyuyue/nxtp src/encoding.py,
# construct_text_inputs); inference always uses the first.
PROMPTS = (
    "The objects in the image are",
    "The items present in the picture are",
    "The elements depicted in the image are",
    "The objects shown in the photograph are",
    "The items visible in the image are",
    "The objects that appear in the picture are",
    "The elements featured in the image are",
    "The items captured in the photograph are",
    "The elements seen in the picture are",
    "The items represented in the image are",
)
PROMPT = PROMPTS[0]


@dataclass
class VisionConfig:
    """CLIP ViT (OpenAI layout). Defaults: ViT-L/14 at 224 px."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2


@dataclass
class LanguageConfig:
    """LLaMA decoder, already truncated to `n_layers` blocks. Defaults: LLaMA-2 7B cut to 6 blocks."""

    dim: int = 4096
    n_layers: int = 6
    n_heads: int = 32
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    vocab_size: int = 32002

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        # Meta's SwiGLU sizing: 2/3 of 4*dim, optionally scaled, rounded up to multiple_of.
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


@dataclass
class NXTPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    special_tokens: tuple = SPECIAL_TOKENS
    prompt: str = PROMPT

    def to_dict(self) -> dict:
        d = asdict(self)
        d["special_tokens"] = list(self.special_tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NXTPConfig":
        return cls(
            vision=VisionConfig(**d["vision"]),
            language=LanguageConfig(**d["language"]),
            special_tokens=tuple(d.get("special_tokens", SPECIAL_TOKENS)),
            prompt=d.get("prompt", PROMPT),
        )


def released() -> NXTPConfig:
    """The published NXTP model: CLIP ViT-L/14 @ 224 px + LLaMA-2 7B truncated to 6 blocks (1.78B)."""
    return NXTPConfig()
