"""PFlowConfig: the configuration of a ParallelFlow (rank-R delta rule) language model.

Field names follow flash-linear-attention's DeltaNet config where one exists, and Llama's for the optional
softmax-attention layers of a hybrid.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from .ops import ALGORITHMS, MIN_CHUNK_SIZE, valid_chunk_size
from .ops import BACKENDS as KERNEL_BACKENDS
from .ops import MODES as RANK_MODES

LAYER_TYPES = ("pflow", "attention", "sliding_attention")
# config.json stores transformers' own layer-type names, so plain transformers (AutoTokenizer without this
# code, say) can read it; both spellings are accepted on load.
SAVED_LAYER_TYPES = {"pflow": "linear_attention", "attention": "full_attention"}
LOADED_LAYER_TYPES = {saved: ours for ours, saved in SAVED_LAYER_TYPES.items()}
FLOWS = ("euler", "exact")
HIDDEN_ACTS = ("silu", "swish")
# The Triton kernels' limits (triton_utils.MAX_RANK / MAX_HEAD_DIM; not imported: that module needs triton).
MAX_RANK = 8
MAX_HEAD_DIM = 256
MAX_CONV_SIZE = 16
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_heads",
    "head_k_dim",
    "head_v_dim",
    "intermediate_size",
    "max_position_embeddings",
    "num_attention_heads",
    "num_key_value_heads",
    "attention_head_dim",
)
BOOL_FIELDS = (
    "allow_neg_eigval",
    "use_short_conv",
    "use_gate",
    "attention_bias",
    "attention_output_bias",
    "attention_qk_norm",
    "tie_word_embeddings",
    "use_cache",
    "fused_loss",
)
POSITIVE_REAL_FIELDS = ("rope_theta", "norm_eps", "initializer_range")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_real(value: object) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _require(condition: bool, field: str, allowed: str, value) -> None:
    if not condition:
        raise ValueError(f"PFlowConfig.{field} must be {allowed}, got {value!r}")


def _require_sizes(config: PretrainedConfig, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        _require(_is_int(value) and value >= 1, field, "an integer >= 1", value)


class PFlowConfig(PretrainedConfig):
    """Configuration of `PFlowModel` / `PFlowForCausalLM`.

    Mixer ("pflow" layers): each token emits one query [H, K], `rank` keys [H, R, K], `rank` values [H, R, V]
    and `rank` step sizes [H, R]; the state [H, K, V] follows the rank-R delta rule.

    Args:
        vocab_size, hidden_size, num_hidden_layers, intermediate_size, hidden_act: the usual LM sizes.
            `intermediate_size=None` takes fla's rule: 2/3 * 4 * hidden_size rounded up to a multiple of 256.
        num_heads: heads of the delta-rule mixer. `head_k_dim` / `head_v_dim` (at most 256, the Triton
            kernels' limit) default to hidden_size // num_heads (num_heads must then divide hidden_size).
        rank: R >= 1 (at most 8) keys/values/betas per head per token.
        rank_mode: "sum" (ParallelFlow Euler step: the R components act together) or "product" (DeltaProduct:
            the R components act one after the other).
        flow: "euler" (one Euler step per token) or "exact" (product of exponentials: exact integration of the
            constant-rate step; a rescaling of the drivers).
        allow_neg_eigval: betas in (0, 2) instead of (0, 1): transition eigenvalues in [-1, 1].
        use_short_conv, conv_size: depthwise causal convolution on q, k, v (kernel `conv_size`).
        use_gate: output gate (RMSNorm(o) * SiLU(g_proj(x))), as fla's DeltaNet `use_gate`.
        layer_types: per layer "pflow", "attention" (softmax, RoPE) or "sliding_attention" (needs
            `sliding_window`).
        num_attention_heads, num_key_value_heads, attention_head_dim, rope_theta, sliding_window: softmax
            layers. attention_bias / attention_output_bias: biases on q/k/v / on o (Llama's attention_bias
            sets both; Qwen2 has the first only). attention_qk_norm: per-head RMSNorm of q and k before RoPE
            (Qwen3).
        chunk_size: tokens per chunk of the chunked algorithms: a power of two >= 16 (what both kernel
            backends accept).
        algorithm: "auto", "tensor_inv", "sigdelta" or "recurrent" (training/prefill algorithm).
        kernel_backend: "auto" (Triton on CUDA when available, else torch), "triton" or "torch".
        fused_loss: in training mode (`model.train()`) with `labels`, compute the loss from the hidden states
            in chunks (`loss_parallelflow.linear_cross_entropy`, Liger-Kernel's when installed) without
            full-vocabulary logits; `outputs.logits` is then None. Evaluation mode always returns logits.
        pad_token_id, bos_token_id, eos_token_id: None or a token id in [0, vocab_size) (eos: or a list).

    Every field is validated on construction, on `from_pretrained` overrides and on save (`ValueError`
    naming the field).
    """

    model_type = "parallelflow"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_heads: int = 8,
        head_k_dim: int | None = None,
        head_v_dim: int | None = None,
        rank: int = 1,
        rank_mode: str = "sum",
        flow: str = "euler",
        allow_neg_eigval: bool = False,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_gate: bool = False,
        layer_types: list[str] | None = None,
        num_attention_heads: int | None = None,
        num_key_value_heads: int | None = None,
        attention_head_dim: int | None = None,
        sliding_window: int | None = None,
        rope_theta: float = 10000.0,
        attention_bias: bool = False,
        attention_output_bias: bool = False,
        attention_qk_norm: bool = False,
        intermediate_size: int | None = None,
        hidden_act: str = "silu",
        chunk_size: int = 64,
        algorithm: str = "auto",
        kernel_backend: str = "auto",
        fused_loss: bool = True,
        max_position_embeddings: int = 2048,
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        # transformers' own __init__ validator rejects layer names it does not know: set our fields after it.
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_attention_heads = num_attention_heads if num_attention_heads is not None else num_heads
        # The defaults below are computed from these: check them first, so a bad one is named.
        _require_sizes(self, "hidden_size", "num_hidden_layers", "num_heads", "num_attention_heads")
        if layer_types is None:
            layer_types = ["pflow"] * num_hidden_layers
        _require(
            isinstance(layer_types, list | tuple), "layer_types", f"a list of {LAYER_TYPES}", layer_types
        )
        self.layer_types = [LOADED_LAYER_TYPES.get(t, t) if isinstance(t, str) else t for t in layer_types]
        if head_k_dim is None and "pflow" in self.layer_types:
            _require(
                hidden_size % num_heads == 0,
                "num_heads",
                f"a divisor of hidden_size={hidden_size} when head_k_dim is not given",
                num_heads,
            )
        self.head_k_dim = head_k_dim if head_k_dim is not None else hidden_size // num_heads
        self.head_v_dim = head_v_dim if head_v_dim is not None else self.head_k_dim
        if attention_head_dim is None and any(t in self.layer_types for t in LAYER_TYPES[1:]):
            _require(
                hidden_size % self.num_attention_heads == 0,
                "num_attention_heads",
                f"a divisor of hidden_size={hidden_size} when attention_head_dim is not given",
                self.num_attention_heads,
            )
        self.attention_head_dim = (
            attention_head_dim if attention_head_dim is not None else hidden_size // self.num_attention_heads
        )
        self.num_key_value_heads = (
            num_key_value_heads if num_key_value_heads is not None else self.num_attention_heads
        )
        self.rank = rank
        self.rank_mode = rank_mode
        self.flow = flow
        self.allow_neg_eigval = allow_neg_eigval
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.use_gate = use_gate
        self.sliding_window = sliding_window
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.attention_output_bias = attention_output_bias
        self.attention_qk_norm = attention_qk_norm
        if intermediate_size is None:
            intermediate_size = 256 * ((int(hidden_size * 4 * 2 / 3) + 255) // 256)
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.chunk_size = chunk_size
        self.algorithm = algorithm
        self.kernel_backend = kernel_backend
        self.fused_loss = fused_loss
        self.max_position_embeddings = max_position_embeddings
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.validate_pflow()

    def to_dict(self) -> dict:
        """As PretrainedConfig's, with layer types under transformers' names (SAVED_LAYER_TYPES)."""
        output = super().to_dict()
        output["layer_types"] = [SAVED_LAYER_TYPES.get(t, t) for t in output["layer_types"]]
        return output

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As PretrainedConfig's, then validated again: `from_pretrained(..., field=value)` overrides fields
        after construction."""
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).validate_pflow()
        return result

    def validate(self) -> None:
        """transformers' config validators, except its layer-type check (it knows only its own attention layer
        names; ours are LAYER_TYPES), then ours."""
        for validator in getattr(PretrainedConfig, "__class_validators__", ()):
            if validator.__name__ != "validate_layer_type":
                validator(self)
        self.validate_pflow()

    def validate_pflow(self) -> None:
        """Raise `ValueError` naming the first invalid field and its allowed values."""
        _require_sizes(self, *SIZE_FIELDS)
        for field in BOOL_FIELDS:
            _require(isinstance(getattr(self, field), bool), field, "a bool", getattr(self, field))
        for field in POSITIVE_REAL_FIELDS:
            value = getattr(self, field)
            _require(_is_positive_real(value), field, "a finite number > 0", value)
        for field, choices in (
            ("rank_mode", RANK_MODES),
            ("flow", FLOWS),
            ("algorithm", ALGORITHMS),
            ("kernel_backend", KERNEL_BACKENDS),
            ("hidden_act", HIDDEN_ACTS),
        ):
            value = getattr(self, field)
            _require(isinstance(value, str) and value in choices, field, f"one of {choices}", value)
        _require(
            _is_int(self.rank) and 1 <= self.rank <= MAX_RANK,
            "rank",
            f"an integer in [1, {MAX_RANK}]",
            self.rank,
        )
        _require(
            _is_int(self.conv_size) and 1 <= self.conv_size <= MAX_CONV_SIZE,
            "conv_size",
            f"an integer in [1, {MAX_CONV_SIZE}]",
            self.conv_size,
        )
        _require(
            valid_chunk_size(self.chunk_size),
            "chunk_size",
            f"a power of two >= {MIN_CHUNK_SIZE} (the chunk sizes both kernel backends accept)",
            self.chunk_size,
        )
        self._validate_layers()
        self._validate_token_ids()

    def _validate_layers(self) -> None:
        layer_types = self.layer_types
        _require(
            isinstance(layer_types, list | tuple)
            and all(isinstance(t, str) and t in LAYER_TYPES for t in layer_types),
            "layer_types",
            f"a list of {LAYER_TYPES}",
            layer_types,
        )
        _require(
            len(layer_types) == self.num_hidden_layers,
            "layer_types",
            f"a list of num_hidden_layers={self.num_hidden_layers} entries",
            layer_types,
        )
        if "pflow" in layer_types:
            for field in ("head_k_dim", "head_v_dim"):
                value = getattr(self, field)
                _require(
                    value <= MAX_HEAD_DIM,
                    field,
                    f"at most {MAX_HEAD_DIM} (the Triton kernels' largest head width)",
                    value,
                )
        _require(
            self.sliding_window is None or (_is_int(self.sliding_window) and self.sliding_window >= 1),
            "sliding_window",
            "None or an integer >= 1",
            self.sliding_window,
        )
        if "sliding_attention" in layer_types:
            _require(
                self.sliding_window is not None,
                "sliding_window",
                "an integer >= 1 when layer_types has 'sliding_attention'",
                self.sliding_window,
            )
        if any(t in layer_types for t in LAYER_TYPES[1:]):
            _require(
                self.num_attention_heads % self.num_key_value_heads == 0,
                "num_key_value_heads",
                f"a divisor of num_attention_heads={self.num_attention_heads}",
                self.num_key_value_heads,
            )
            _require(
                self.attention_head_dim % 2 == 0,
                "attention_head_dim",
                "even (RoPE rotates pairs)",
                self.attention_head_dim,
            )

    def _validate_token_ids(self) -> None:
        allowed = f"None or an integer in [0, vocab_size={self.vocab_size})"
        for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, field)
            ids = value if field == "eos_token_id" and isinstance(value, list) and value else [value]
            _require(
                value is None or all(_is_int(i) and 0 <= i < self.vocab_size for i in ids),
                field,
                allowed + (" (or a non-empty list of such integers)" if field == "eos_token_id" else ""),
                value,
            )
