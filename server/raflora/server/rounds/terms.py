"""A client's terms (rank, alpha and scale, declared examples) and a push header against them.

Pure checks, no state and no I/O: the runtime calls them with what it knows. The scale a
client brings is range-checked here, so that s·B·A can neither over- nor underflow later.
"""

from __future__ import annotations

import math
import re

from raflora.server.engine import AdapterSchema, Weighting, lora_scaling
from raflora.server.engine.validation import validate_rank

from ..config import FederationConfig, check_id
from ..errors import InvalidArgumentError
from ..storage import ClientRecord
from ..storage.tensorio import max_upload_bytes

_SHA_RE = re.compile(r"[0-9a-f]{64}")
# The LoRA scale s = alpha/r (or alpha/√r) a client may bring: far beyond any real setting, and
# far from where s·B·A over- or underflows.
MIN_SCALE = 1e-6
MAX_SCALE = 1e6


def client_scale(config: FederationConfig, field: str, alpha: float, rank: int) -> float:
    if not math.isfinite(alpha) or alpha <= 0:
        raise InvalidArgumentError(field, f"must be a positive number, got {alpha}")
    scale = lora_scaling(alpha, rank, config.scaling_rule)
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise InvalidArgumentError(
            field,
            f"alpha {alpha:g} at rank {rank} gives the LoRA scale {scale:g}, outside "
            f"{MIN_SCALE:g}..{MAX_SCALE:g}",
        )
    return scale


def _check_examples(config: FederationConfig, num_examples: int) -> None:
    if config.weighting is Weighting.EXAMPLES and num_examples < 1:
        raise InvalidArgumentError(
            "num_examples", "must be >= 1: this federation weighs clients by examples"
        )


def join_terms(
    config: FederationConfig,
    client_id: str,
    rank: int,
    num_examples: int,
    lora_alpha: float,
    observer: bool = False,
) -> ClientRecord:
    """The record a join asks for, or the first thing wrong with it."""
    check_id("client_id", client_id)
    validate_rank(rank, config.max_rank, config.allowed_ranks or None)
    if not 0 <= num_examples <= config.max_examples_per_client:
        raise InvalidArgumentError(
            "num_examples",
            f"{num_examples} is outside 0..{config.max_examples_per_client} "
            "(the federation's max_examples_per_client)",
        )
    if not observer:  # an observer's examples weigh nothing: it never pushes
        _check_examples(config, num_examples)
    alpha = lora_alpha or config.lora_alpha
    scale = client_scale(config, "lora_alpha", alpha, rank)
    return ClientRecord(client_id, rank, num_examples, alpha, scale, observer)


def check_sha256(sha256: str) -> None:
    if not _SHA_RE.fullmatch(sha256):
        raise InvalidArgumentError("sha256", "must be 64 lowercase hex digits")


def check_push_terms(
    config: FederationConfig,
    schema: AdapterSchema,
    joined: ClientRecord,
    rank: int,
    num_examples: int,
    lora_alpha: float,
    total_bytes: int,
) -> None:
    """A push header must keep to the terms of the client's join."""
    if rank != joined.rank:
        raise InvalidArgumentError(
            "rank", f"upload rank {rank} != rank {joined.rank} given at join"
        )
    _check_examples(config, num_examples)
    if num_examples > joined.num_examples:
        raise InvalidArgumentError(
            "num_examples",
            f"{num_examples} exceeds the {joined.num_examples} examples declared at join",
        )
    if lora_alpha and lora_alpha != joined.lora_alpha:
        raise InvalidArgumentError(
            "lora_alpha",
            f"{lora_alpha:g} differs from the alpha {joined.lora_alpha:g} given at join; "
            "join again (between rounds) to change it",
        )
    limit = max_upload_bytes(schema, rank)
    if not 0 < total_bytes <= limit:
        raise InvalidArgumentError(
            "total_bytes", f"{total_bytes} is outside 1..{limit} for rank {rank}"
        )
