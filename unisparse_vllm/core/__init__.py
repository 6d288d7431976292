"""The UniSparse method in plain PyTorch: the readable, testable reference.

Nothing here imports vLLM. ``kernels`` provides the same functions, fast, on CUDA.
"""

from .attention import dense_attention, sparse_attention
from .batch import (
    ContiguousKV,
    KVSource,
    PagedKV,
    PrefillBatch,
    device_offsets,
    int32_tables,
    num_key_blocks,
    query_block_range,
)
from .estimate import block_mass, composite_keys, composite_queries, pool_heads
from .metrics import (
    ExactAttention,
    Fidelity,
    attended_pairs,
    exact_attention,
    exact_key_block_probs,
    fidelity,
    relative_error,
    spearman,
)
from .plan import (
    BatchMassEstimator,
    BlockPlan,
    batch_block_mass,
    causal_row_blocks,
    plan_prefill,
    request_rows,
)
from .select import select_blocks

__all__ = [
    "BatchMassEstimator",
    "BlockPlan",
    "ContiguousKV",
    "ExactAttention",
    "Fidelity",
    "KVSource",
    "PagedKV",
    "PrefillBatch",
    "attended_pairs",
    "batch_block_mass",
    "block_mass",
    "causal_row_blocks",
    "composite_keys",
    "composite_queries",
    "dense_attention",
    "device_offsets",
    "exact_attention",
    "exact_key_block_probs",
    "fidelity",
    "int32_tables",
    "num_key_blocks",
    "plan_prefill",
    "pool_heads",
    "query_block_range",
    "relative_error",
    "request_rows",
    "select_blocks",
    "sparse_attention",
    "spearman",
]
