"""Model shapes the benchmarks sweep, and the sweep grids (quick default and --full)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn: str  # "gelu" (BERT) or "swiglu" (LLaMA)

    @property
    def ffn_matrices(self) -> int:
        """The FFN's weight matrices: up (and gate) and down."""
        return 3 if self.ffn == "swiglu" else 2

    def ffn_flops(self, rows: int) -> int:
        """Floating-point operations of the dense FFN on `rows` rows."""
        return 2 * rows * self.hidden * self.intermediate * self.ffn_matrices


# The op benchmarks skip a case above this cost per call (floating-point operations)
FLOP_CAP = {"cpu": 60e9, "cuda": 10e12}


SHAPES = {
    s.name: s
    for s in [
        Shape("bert-base", 768, 3072, 12, 12, 64, "gelu"),
        Shape("bert-large", 1024, 4096, 16, 16, 64, "gelu"),
        Shape("llama-7b", 4096, 11008, 32, 32, 128, "swiglu"),
        Shape("llama3-8b", 4096, 14336, 32, 8, 128, "swiglu"),
        Shape("all-MiniLM-L6-v2", 384, 1536, 12, 12, 32, "gelu"),
        Shape("SmolLM2-135M", 576, 1536, 9, 3, 64, "swiglu"),
    ]
}

PRUNE_RATES_FULL = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9)
ROWS_FULL = (1, 8, 64, 512, 2048, 4096, 8192)

QUICK = dict(
    shapes=("bert-base", "SmolLM2-135M"),
    prune_rates=(0.0, 0.35, 0.65, 0.9),
    rows=(1, 8, 64, 512),
)
FULL = dict(shapes=tuple(SHAPES), prune_rates=PRUNE_RATES_FULL, rows=ROWS_FULL)
