"""Real data that ships inside installed packages (no downloads)."""

from .canvas import (
    COLORS,
    POSITIONS,
    SHIFT_CANVAS,
    SHIFT_QUERY,
    CanvasBatch,
    CanvasConfig,
    QueryBatch,
    QueryConfig,
    canvas_sources,
    cluttered_split,
    digit_hashes,
    make_cluttered,
    make_query,
    query_phrasings,
    query_split,
)
from .digits import DigitSplit, load_mnist_5k, load_sklearn_digits
from .text import TEXT_DIM, TextEncoder, minilm_directory

__all__ = [
    "COLORS",
    "POSITIONS",
    "SHIFT_CANVAS",
    "SHIFT_QUERY",
    "TEXT_DIM",
    "CanvasBatch",
    "CanvasConfig",
    "DigitSplit",
    "QueryBatch",
    "QueryConfig",
    "TextEncoder",
    "canvas_sources",
    "cluttered_split",
    "digit_hashes",
    "load_mnist_5k",
    "load_sklearn_digits",
    "make_cluttered",
    "make_query",
    "minilm_directory",
    "query_phrasings",
    "query_split",
]
