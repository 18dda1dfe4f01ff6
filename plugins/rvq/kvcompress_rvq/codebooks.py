"""rvq codebooks: learned by k-means then EMA (for `kvcompress calibrate`), loaded from safetensors files.

The file is the one `kvcompress calibrate` writes (see kvcompress.calibrate): tensors named
"layers.{layer}.{role}.codewords" (fp16 [depth, codebook_size, group]) and string metadata: "format",
"model", "spec", "num_layers", "head_dim", "kv_heads" and "entries", a JSON map from "{layer}.{role}" to the
quantizer and codebook stages that entry was learned with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcompress import KVCompressError
from kvcompress_rvq.kernels import nearest_codeword
from kvcompress.methods import LayerContext, short_model_name
from kvcompress_rvq.quantizer import CODEBOOK_FIELDS, Grouping, RVQCodebooks, normalized_groups

FILE_FORMAT = "kvcompress-codebooks/1"


class CodebookError(KVCompressError):
    """A codebook file is missing, malformed, or made for another model or spec."""


# ---------------------------------------------------------------------------------------------------
# Loading


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise CodebookError(f"{path}: not a readable safetensors codebook file ({exc})") from None


def load(spec, ctx: LayerContext) -> RVQCodebooks:
    """The codebooks of ctx.layer and ctx.role from spec.path, after checking the file fits ctx."""
    path = ctx.resolve_path(spec.path)  # `{model}` expanded, relative to the spec file
    command = f"kvcompress calibrate SPEC --model {ctx.model or ctx.model_name()} --out {path}"
    if not path.is_file():
        raise CodebookError(
            f"codebook file {path} does not exist; write it with `{command}` (SPEC: the spec file that names it)"
        )
    meta = read_metadata(path)
    fix = f"recalibrate with `{command}`"
    if meta.get("format") != FILE_FORMAT:
        raise CodebookError(f"{path}: not a kvcompress codebook file (format {meta.get('format')!r}, expected {FILE_FORMAT!r})")
    try:
        num_layers, head_dim = int(meta["num_layers"]), int(meta["head_dim"])
        entries = json.loads(meta["entries"])
    except (KeyError, ValueError) as exc:
        raise CodebookError(f"{path}: codebook metadata is incomplete ({exc}); {fix}") from None
    model = meta.get("model")
    if ctx.model is not None and (model is None or short_model_name(model) != ctx.model_name()):
        raise CodebookError(f"{path}: codebooks were calibrated for model {model!r}, not {ctx.model!r}; {fix}")
    if head_dim != ctx.head_dim:
        raise CodebookError(f"{path}: codebooks are for head_dim {head_dim}, the cache has head_dim {ctx.head_dim}; {fix}")
    if ctx.model is not None and num_layers != ctx.num_layers:
        raise CodebookError(f"{path}: codebooks are for {num_layers} layers, the model has {ctx.num_layers}; {fix}")
    key = f"{ctx.layer}.{ctx.role}"
    if key not in entries:
        raise CodebookError(
            f"{path}: no codebooks for layer {ctx.layer} {ctx.role} (the file has {len(entries)} entries for a "
            f"{num_layers}-layer model); {fix}"
        )
    # codebooks learned in one space are useless in another: the file must come from the same transform
    # (files without the record predate transforms in calibration and were learned untransformed)
    learned_after = entries[key].get("transform")
    wanted = ctx.transform.model_dump(mode="json") if ctx.transform is not None else None
    if learned_after != wanted:
        raise CodebookError(
            f"{path}: the codebooks of layer {ctx.layer} {ctx.role} were learned after transform {learned_after}, "
            f"but the spec's pipeline applies {wanted}; {fix}"
        )
    from safetensors import safe_open

    name = f"layers.{key}.codewords"
    with safe_open(str(path), framework="pt") as f:
        if name not in f.keys():
            raise CodebookError(f"{path}: tensor {name!r} is missing; {fix}")
        codewords = f.get_tensor(name)
    quantizer = entries[key].get("quantizer", {})
    fields = {name: quantizer.get(name) for name in CODEBOOK_FIELDS}
    return RVQCodebooks(codewords=codewords, fields=fields, source=str(path))


# ---------------------------------------------------------------------------------------------------
# Learning


def _sum_by_index(x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """[size, g]: row c is the sum of the rows of x whose index is c (index_put_ accumulates far faster
    than index_add_ on CPU)."""
    return torch.zeros(size, x.shape[1], dtype=x.dtype, device=x.device).index_put_((index,), x, accumulate=True)


def kmeans(x: torch.Tensor, size: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Codebook [size, g] from vectors x [N, g]: distinct random vectors, then Lloyd iterations.

    A codeword left with no vectors is re-seeded with a random vector, so every codeword stays in use.
    """
    n = x.shape[0]
    centers = x[torch.randperm(n, generator=generator)[:size]].clone()
    for _ in range(iterations):
        assigned = nearest_codeword(x, centers)
        counts = torch.bincount(assigned, minlength=size)
        sums = _sum_by_index(x, assigned, size)
        used = counts > 0
        centers[used] = sums[used] / counts[used].unsqueeze(-1).float()
        empty = int((~used).sum())
        if empty:
            centers[~used] = x[torch.randperm(n, generator=generator)[:empty]]
    return centers


@dataclass
class EMAState:
    """Exponential moving averages of one level's codeword counts [C] and vector sums [C, g]."""

    counts: torch.Tensor
    sums: torch.Tensor


def ema_init(x: torch.Tensor, codebook: torch.Tensor, batch: int) -> EMAState:
    """EMA state that reproduces `codebook`, with counts at the scale of one mini-batch of `batch` vectors
    (so the first updates neither shrink the codewords nor jump)."""
    counts = torch.bincount(nearest_codeword(x, codebook), minlength=codebook.shape[0]).float() * (batch / x.shape[0])
    return EMAState(counts=counts, sums=counts.unsqueeze(-1) * codebook)


def ema_step(codebooks: torch.Tensor, states: list[EMAState], batch: torch.Tensor, decay: float, eps: float) -> None:
    """One EMA update of every level (in place) from a mini-batch of vectors [B, g], level by level on residuals.

    counts <- decay counts + (1 - decay) n_c; sums <- decay sums + (1 - decay) sum of the residuals assigned to c;
    codeword c <- sums_c / counts_c with Laplace smoothing of the counts (eps), as in VQ-VAE.
    """
    residual = batch.clone()
    size = codebooks.shape[1]
    for level, state in enumerate(states):
        assigned = nearest_codeword(residual, codebooks[level])
        counts = torch.bincount(assigned, minlength=size).float()
        sums = _sum_by_index(residual, assigned, size)
        state.counts.mul_(decay).add_(counts, alpha=1 - decay)
        state.sums.mul_(decay).add_(sums, alpha=1 - decay)
        total = state.counts.sum()
        smoothed = (state.counts + eps) / (total + size * eps) * total
        codebooks[level] = state.sums / smoothed.unsqueeze(-1)
        residual -= codebooks[level][assigned]


def group_vectors(samples: torch.Tensor, quantizer, head_dim: int) -> torch.Tensor:
    """Calibration vectors [N, head_dim] -> the normalized group vectors [N * groups, group] the codebooks code."""
    if head_dim % quantizer.group:
        raise ValueError(f"rvq group {quantizer.group} does not divide head_dim {head_dim}")
    grouping = Grouping(head_dim, quantizer.group, quantizer.layout)
    _, groups = normalized_groups(samples, grouping)
    return groups.reshape(-1, quantizer.group)


def learn(spec, quantizer, samples: torch.Tensor, ctx: LayerContext) -> dict[str, torch.Tensor]:
    """Codebooks of one layer and role from calibration vectors samples [N, head_dim]: {"codewords": fp16
    [depth, codebook_size, group]}. k-means level by level on the residuals, then EMA updates of all levels."""
    if samples.dim() != 2 or samples.shape[1] != ctx.head_dim:
        raise ValueError(f"calibration samples must be [N, {ctx.head_dim}], got {tuple(samples.shape)}")
    role_index = 0 if ctx.role == "keys" else 1
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + ctx.layer * 2 + role_index)
    if samples.shape[0] > spec.samples:
        samples = samples[torch.randperm(samples.shape[0], generator=generator)[: spec.samples]]
    x = group_vectors(samples.float(), quantizer, ctx.head_dim)
    size = quantizer.codebook_size
    if x.shape[0] < size:
        raise ValueError(
            f"layer {ctx.layer} {ctx.role}: {x.shape[0]} group vectors cannot train {size} codewords; "
            f"calibrate on more text or raise the codebook stage's `samples`"
        )
    codebooks = torch.empty(quantizer.depth, size, quantizer.group)
    residual = x.clone()
    for level in range(quantizer.depth):
        codebooks[level] = kmeans(residual, size, spec.iterations, generator)
        residual -= codebooks[level][nearest_codeword(residual, codebooks[level])]
    if spec.ema_epochs:
        states, residual = [], x.clone()
        for level in range(quantizer.depth):
            states.append(ema_init(residual, codebooks[level], spec.batch))
            residual -= codebooks[level][nearest_codeword(residual, codebooks[level])]
        for _ in range(spec.ema_epochs):
            order = torch.randperm(x.shape[0], generator=generator)
            for start in range(0, x.shape[0], spec.batch):
                ema_step(codebooks, states, x[order[start : start + spec.batch]], spec.decay, spec.eps)
    return {"codewords": codebooks.half()}
