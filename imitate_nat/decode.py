"""Decoding: AT beam search and greedy (KV cache), AT rescoring, NAT one-pass, and Length
Parallel Decoding (LPD, paper §4).

All functions take `src` as a padded (B, S) tensor of source ids + EOS (data.source_tensor)
and return one list of token ids per sentence, without BOS/EOS/padding.
"""
from __future__ import annotations

import torch

from .at import ATDemonstrator
from .layers import padding_mask, select_cache
from .nat import NATLearner, token_argmax


def max_output_length(src: torch.Tensor, pad_id: int, a: float, b: int, cap: int) -> int:
    """Longest output (tokens incl. EOS) for this batch: a·S + b, within the positional table."""
    return max(1, min(int(a * int(src.ne(pad_id).sum(1).max()) + b), cap))


def _strip(row: list[int], eos_id: int, pad_id: int) -> list[int]:
    out = []
    for t in row:
        if t == eos_id or t == pad_id:
            break
        out.append(t)
    return out


def greedy_search(at: ATDemonstrator, src: torch.Tensor, max_len_a: float = 1.5, max_len_b: int = 10,
                  min_len: int = 0):
    """Argmax at every step with a KV cache: beam_search with one hypothesis per sentence
    (sentences that ended leave the batch, as there)."""
    return beam_search(at, src, beam_size=1, max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len)


def _best_hypotheses(tokens, scores, lengths, finished, k: int, length_penalty: float):
    """Each sentence's winner among its k rows: max log p(y|x) / |y|^length_penalty over ended
    hypotheses. Returns its token rows without BOS, as lists."""
    norm = (scores / lengths.clamp_min(1).pow(length_penalty)).masked_fill(~finished, float("-inf"))
    best = norm.argmax(-1)
    n = best.size(0)
    return tokens.view(n, k, -1)[torch.arange(n, device=tokens.device), best, 1:].tolist()


@torch.no_grad()
def beam_search(at: ATDemonstrator, src: torch.Tensor, beam_size: int = 4, length_penalty: float = 1.0,
                max_len_a: float = 1.5, max_len_b: int = 10, min_len: int = 0):
    """Batched beam search with a KV cache.

    Hypotheses that produced EOS stay in the beam with a frozen score (they extend only with
    PAD at zero cost), so a sentence's k rows move in lockstep and the cache is reordered with
    one index. A sentence whose k hypotheses have all ended leaves the batch (rows dropped from
    the cache): nothing can change its result any more, so later steps compute only for the
    sentences still decoding. The winner maximizes log p(y|x) / |y|^length_penalty, |y|
    counting EOS. `min_len` forbids EOS before that many tokens (the benchmark uses it to fix
    output lengths)."""
    cfg, k = at.cfg, beam_size
    memory, src_keep = at.encode(src)
    B, V = src.size(0), cfg.vocab_size
    max_len = max_output_length(src, cfg.pad_id, max_len_a, max_len_b, cfg.max_positions)
    # memory is NOT repeated per beam: the decoder folds each sentence's k consecutive
    # hypothesis rows onto one copy of its source (TransferLayer cross-attention).
    device = src.device
    tokens = torch.full((B * k, 1), cfg.bos_id, dtype=torch.long, device=device)
    scores = torch.full((B, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step yields distinct ones
    finished = torch.zeros(B, k, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, k, device=device)  # tokens emitted incl. EOS
    frozen = torch.full((min(k, V),), float("-inf"), device=device)
    frozen[0] = 0.0  # an ended hypothesis's candidates: PAD at zero cost (column 0), nothing else
    ids = torch.arange(B, device=device)  # original index of each sentence still decoding
    hyps: list = [None] * B
    cache: dict = {}
    for step in range(max_len):
        n = ids.size(0)  # sentences still decoding
        logits, _ = at.decode(tokens[:, -1:], memory, src_keep, cache=cache, start=step)
        lp = torch.log_softmax(logits[:, -1].float(), dim=-1)  # (n·k, V)
        lp[:, [cfg.pad_id, cfg.bos_id]] = float("-inf")
        if step < min_len:
            lp[:, cfg.eos_id] = float("-inf")
        if step == max_len - 1:  # out of room: every live hypothesis must end now
            top, top_tok = lp[:, cfg.eos_id:cfg.eos_id + 1], torch.full_like(lp[:, :1], cfg.eos_id, dtype=torch.long)
        else:
            # A sentence's k best extensions are among each row's k best tokens, so only those
            # k·k candidates are ranked, not k·V.
            top, top_tok = lp.topk(min(k, V), dim=-1)
        top = torch.where(finished.view(-1, 1), frozen[: top.size(1)], top)  # ended: PAD at zero cost
        top_tok = top_tok.masked_fill(finished.view(-1, 1), cfg.pad_id)
        kk = top.size(1)
        scores, flat = (scores.view(-1, 1) + top).view(n, k * kk).topk(k, dim=-1)
        origin, token = flat // kk, top_tok.view(n, k * kk).gather(1, flat)
        row = (origin + torch.arange(n, device=device).unsqueeze(1) * k).view(-1)
        was_finished = finished.gather(1, origin)
        lengths = lengths.gather(1, origin) + (~was_finished).float()
        finished = was_finished | token.eq(cfg.eos_id)
        if k > 1:  # with one hypothesis per sentence the order never changes
            tokens = tokens.index_select(0, row)
            select_cache(cache, row)
        tokens = torch.cat([tokens, token.view(-1, 1)], dim=1)
        # Done: every hypothesis ended, or out of room (rows that could never score stay unended).
        done = finished.all(1) | (step == max_len - 1)
        n_done = int(done.sum())  # the one host sync per step
        if n_done == 0:
            continue
        rows = _best_hypotheses(tokens.view(n, k, -1)[done].view(-1, tokens.size(1)), scores[done],
                                lengths[done], finished[done], k, length_penalty)
        for i, r in zip(ids[done].tolist(), rows):
            hyps[i] = _strip(r, cfg.eos_id, cfg.pad_id)
        if n_done == n:
            break
        keep = (~done).nonzero().squeeze(1)
        keep_rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
        tokens, scores, finished, lengths, ids = tokens[keep_rows], scores[keep], finished[keep], lengths[keep], ids[keep]
        memory, src_keep = memory[keep], src_keep[keep]
        select_cache(cache, keep_rows, keep)
    return hyps


# Rows of logits projected at a time by the packed projections below: a (ROW_CHUNK, V) block
# stays in a CPU core's cache while it is reduced, where (N·T, V) logits would go through memory
# two or three times (V = 32k: 256 rows are 32 MB).
ROW_CHUNK = 64


def _by_chunks(fn, *rows: torch.Tensor) -> torch.Tensor:
    """fn over ROW_CHUNK rows of each of `rows` at a time, results concatenated."""
    return torch.cat([fn(*part) for part in zip(*(r.split(ROW_CHUNK) for r in rows))])


def target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, without building the (…, V) log-probability tensor."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def packed_logits_apply(model, h: torch.Tensor, keep: torch.Tensor, fn, *per_position: torch.Tensor,
                        fill=0) -> torch.Tensor:
    """fn(logits, *per_position values) at the real positions only (keep, (N, T)): the
    vocabulary projection, the model's largest matmul, skips padding, and runs ROW_CHUNK rows at a
    time. Padding positions get `fill`. A host sync (the count of real positions): not for
    CUDA-graph capture, which projects every position instead (`packed=False` callers)."""
    rows = _by_chunks(lambda x, *v: fn(model.output_logits(x), *v), h[keep], *(p[keep] for p in per_position))
    out = torch.full(keep.shape, fill, dtype=rows.dtype, device=rows.device)
    return out.masked_scatter_(keep, rows)


@torch.no_grad()
def at_score(at: ATDemonstrator, memory, src_keep, hyps: torch.Tensor, hyp_lengths: torch.Tensor,
             length_penalty: float = 1.0, packed: bool = True) -> torch.Tensor:
    """Teacher-forced log p(y + EOS | x) / (|y| + 1)^length_penalty for padded hypotheses (N, T).
    Used to rescore LPD candidates; the same normalization as beam_search's final choice.
    `memory` holds one row per hypothesis, or one per source for N / B consecutive hypotheses.
    packed: project only the |y| + 1 real positions of each row (packed_logits_apply)."""
    cfg = at.cfg
    N, T = hyps.shape
    keep = torch.arange(T + 1, device=hyps.device).unsqueeze(0) <= hyp_lengths.unsqueeze(1)  # y + EOS
    tgt_in = torch.cat([torch.full((N, 1), cfg.bos_id, device=hyps.device, dtype=torch.long), hyps], 1)
    tgt_out = torch.cat([hyps, torch.full((N, 1), cfg.pad_id, device=hyps.device, dtype=torch.long)], 1)
    tgt_out.scatter_(1, hyp_lengths.unsqueeze(1), cfg.eos_id)
    tgt_out = tgt_out.masked_fill(~keep, cfg.pad_id)
    tgt_in = tgt_in.masked_fill(~keep, cfg.pad_id)
    h, _ = at.decode_states(tgt_in, memory, src_keep)
    if packed:
        lp = packed_logits_apply(at, h, keep, target_log_probs, tgt_out)
    else:   # every position, padding included (fixed shapes: CUDA graphs)
        lp = target_log_probs(at.output_logits(h), tgt_out) * keep
    return lp.sum(1) / (hyp_lengths + 1).float().pow(length_penalty)


def nat_tokens(nat: NATLearner, h: torch.Tensor, lengths: torch.Tensor, packed: bool = True) -> torch.Tensor:
    """The NAT's argmax token at each position of the top states h (N, T, d); PAD past `lengths`.
    packed: project only the real positions (packed_logits_apply)."""
    cfg = nat.cfg
    keep = padding_mask(lengths, h.size(1))
    if packed:
        return packed_logits_apply(nat, h, keep, lambda logits: token_argmax(logits, cfg), fill=cfg.pad_id)
    return token_argmax(nat.output_logits(h), cfg).masked_fill(~keep, cfg.pad_id)


@torch.no_grad()
def nat_decode(nat: NATLearner, src: torch.Tensor, lengths: torch.Tensor | None = None):
    """One parallel pass at the predicted length T̂ (or the given lengths); argmax per position."""
    enc = nat.encode(src)
    if lengths is None:
        lengths = nat.predict_lengths(enc)
    h, _ = nat.decode_states(enc, lengths)
    tokens = nat_tokens(nat, h, lengths)
    return [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())]


def longest_candidate(max_positions: int, delta_t: int) -> int:
    """The longest LPD candidate (and decoder width) the models can take: the NAT's positional
    table, less one when the AT rescores (ΔT > 0), since its teacher-forced pass reads
    BOS + y, one position more than y. Longer candidates are clamped to it, so a source near
    the model's limit (T̂ ≈ S) decodes rather than overflowing the AT's table."""
    return max_positions - (1 if delta_t > 0 else 0)


def lpd_candidates(nat: NATLearner, at: ATDemonstrator, nat_enc, at_enc, lengths: torch.Tensor, delta_t: int,
                   length_penalty: float = 1.0, width: int | None = None):
    """The core of LPD, free of host syncs when `width` is given (CUDA graphs, graphs.py): decode
    the 2ΔT+1 lengths around each T̂ in ONE NAT pass, score them in ONE teacher-forced AT pass.
    nat_enc: the NAT's Encoded; at_enc: the AT's (memory, src_keep) (unused when ΔT = 0).
    Candidate lengths and `width` are at most longest_candidate(). Without `width` the
    vocabulary projections skip padding (packed_logits_apply), at the cost of host syncs.
    Returns tokens (B·C, W) padded, candidate lengths (B·C,), AT scores (B, C)."""
    cfg, B, C = nat.cfg, lengths.size(0), 2 * delta_t + 1
    longest = longest_candidate(cfg.max_positions, delta_t)
    if width is not None and width > longest:
        raise ValueError(f"decoder width {width} exceeds {longest} (max_positions={cfg.max_positions}, ΔT={delta_t})")
    offsets = torch.arange(-delta_t, delta_t + 1, device=lengths.device)
    cand_len = (lengths.unsqueeze(1) + offsets).clamp(1, longest).view(-1)  # (B*C,)
    # Each source's C candidates are consecutive rows: they share its memory (no per-candidate
    # copies), so encoder keys/values are projected once per source in both passes.
    h, _ = nat.decode_states(nat_enc, cand_len, width=width)
    packed = width is None
    tokens = nat_tokens(nat, h, cand_len, packed)
    if C == 1:
        return tokens, cand_len, torch.zeros(B, 1, device=tokens.device)
    return tokens, cand_len, at_score(at, *at_enc, tokens, cand_len, length_penalty, packed).view(B, C)


def pick_best(tokens: torch.Tensor, cand_len: torch.Tensor, scores: torch.Tensor):
    """Each source's best-scoring candidate: (tokens (B, W), lengths (B,))."""
    B, C = scores.shape
    pick = torch.arange(B, device=scores.device) * C + scores.argmax(-1)
    return tokens[pick], cand_len[pick]


@torch.no_grad()
def lpd_decode(nat: NATLearner, at: ATDemonstrator, src: torch.Tensor, delta_t: int = 3,
               lengths: torch.Tensor | None = None, length_penalty: float = 1.0):
    """Length Parallel Decoding (§4): decode lengths T̂-ΔT … T̂+ΔT (clamped to 1 … longest_candidate)
    in ONE batched NAT pass, score all 2ΔT+1 candidates in ONE teacher-forced AT pass, keep the
    best per source. With ΔT = 0 this is exactly nat_decode."""
    if delta_t < 0:
        raise ValueError(f"delta_t must be >= 0, got {delta_t}")
    nat_enc = nat.encode(src)
    if lengths is None:
        lengths = nat.predict_lengths(nat_enc)
    at_enc = at.encode(src) if delta_t > 0 else None
    tokens, cand_len, scores = lpd_candidates(nat, at, nat_enc, at_enc, lengths, delta_t, length_penalty)
    best, best_len = pick_best(tokens, cand_len, scores)
    return [row[:n] for row, n in zip(best.tolist(), best_len.tolist())]
