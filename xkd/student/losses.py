"""Every loss a method trains with, one function each, with its shapes and the paper's
equation. A leaf: methods import these; these import no method. Each returns a scalar
(mean over what its docstring says), in fp32 whatever the autocast dtype of its inputs.

Notation: M masked positions, V the union vocabulary, k the cached top-k, B rows, C classes,
D vector width, T tokens (padded), H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .targets import tail_cross_entropy


def weighted_sum(parts: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ_name weights[name] · parts[name] over the parts present (a weight of 0 still keeps
    the part in the graph, so its parameters take part in every step: DDP needs that)."""
    return sum(float(weights[name]) * value for name, value in parts.items() if name in weights)


def gold_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The standard cross-entropy with gold labels: logits (N, C) or (M, V), labels (N,) /
    (M,); mean over rows. -1/N Σ_i log softmax(z_i)[y_i]."""
    return F.cross_entropy(logits.float(), labels)


def gold_nll(student_logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same cross-entropy from log-probabilities already computed: student_logp (M, V) =
    log softmax(z_S), labels (M,). -1/M Σ_i student_logp[i, y_i]. (Over a ~290k-token union
    vocabulary the log-softmax is a large memory-bound pass: methods compute it once and
    share it between their terms.)"""
    return F.nll_loss(student_logp, labels)


def distillation_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0,
                               topk_ids: torch.Tensor | None = None, lognorm: torch.Tensor | None = None,
                               student_logp: torch.Tensor | None = None) -> torch.Tensor:
    """The distillation term of every method that distils the teacher's output distribution
    from what the cache stores (mergedistill's L_KD, Khanuja et al. 2021 sec. 3; tinybert's
    L_pred, Soltan et al. 2021 eq. 2, in both stages): the cross-entropy between the teacher's distribution p
    and the student's q = softmax(z_S / τ), mean over rows, times τ².

    student_logits (M, V): z_S over the union vocab (or a classifier's C classes).
    The teacher's p, from teacher_logits z_T and what else is given:
    - topk_ids None: z_T (M, V) covers every student output (a classifier's class logits):
          p = softmax(z_T / τ)
    - topk_ids (M, k) union ids, z_T (M, k) their stored logits: the top-k renormalised
      (MergeDistill's k = 8); no mass elsewhere:
          p_j = exp(z_T,j / τ) / Σ_{i in top-k} exp(z_T,i / τ)   for j in top-k
    - with lognorm (M,), the cached log Σ_all exp(z_T) (τ = 1 only): the exact top-k
      probabilities p_j = exp(z_T,j − lognorm) and the tail 1 − Σ_j p_j, against the student's
      q_j and its mass outside the k tokens: the exact cross-entropy over {the k tokens, the rest}.
    student_logp: log softmax(z_S) if the caller already has it (a union-vocab pass it shares
    with gold_nll); used at τ = 1, ignored otherwise.

        loss = τ² · 1/M Σ_m −Σ_j p_mj · log q_mj      (plus −p_tail · log q_tail with lognorm)

    The τ² rule (Hinton et al. 2015, sec. 2): the gradient of the cross-entropy at τ with
    respect to z_S is (q − p)/τ, which shrinks like 1/τ² as τ grows; the τ² factor keeps the
    gradient sizes independent of τ, so changing τ does not reweigh this term against a
    method's other terms (MLM, hidden-state MSEs). At τ = 1 it is the identity. MultiKD's eq. 3
    has no τ², so multikd divides it out unless its `t2` option keeps it."""
    if lognorm is not None and (topk_ids is None or tau != 1.0):
        raise ValueError("the tail target needs topk_ids and τ = 1: the cached log-normaliser is that of softmax(z_T)")
    if student_logp is not None and tau == 1.0:
        logq = student_logp
    else:
        logq = torch.log_softmax(student_logits.float() / tau, dim=-1)
    if lognorm is not None:
        per_row = tail_cross_entropy(logq, topk_ids, teacher_logits.float(), lognorm.float())
    else:
        p = torch.softmax(teacher_logits.float() / tau, dim=-1)
        per_row = -(p * (logq if topk_ids is None else logq.gather(1, topk_ids))).sum(-1)
    return per_row.mean() * tau**2


def sampled_cross_entropy(student_logp: torch.Tensor, position: torch.Tensor, ids: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """Random-sampling KD (Anshumann et al. 2025, "Sparse Logit Sampling", sec. 3): the
    cross-entropy against the empirical distribution of N draws from the teacher's softmax,
    mean over the M masked positions:

        loss = 1/M Σ_m −Σ_j p̂_mj · log q_mj,   p̂_mj = count_mj / N

    student_logp (M, V) = log softmax(z_S); for each stored (position, id) pair, E entries:
    position (E,), ids (E,) union ids, weights (E,) = count / N. E[p̂] = p makes the loss and
    its gradient, q − p̂ per position, unbiased estimates of the full-distribution ones."""
    picked = student_logp.float()[position, ids]
    return -(weights.float() * picked).sum() / max(student_logp.shape[0], 1)


def squared_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """XD's L2 (its ICLR 2020 submission, sec. 2.3): (B, D) each; 1/B Σ_i ||s_i - t_i||²."""
    return (student.float() - teacher.float()).pow(2).sum(-1).mean()


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor,
               projection: nn.Module | None = None) -> torch.Tensor:
    """TinyBERT's L_embd / L_hidn: student (B, T, D_S), teacher (B, T, D_T), mask (B, T).
        Σ_real tokens ||W·h_S - h_T||² / (n_tokens · D_T)   (W: a learned map when D_S != D_T)."""
    if projection is not None:
        student = projection(student.float())
    mask = attention_mask.to(torch.float32)[:, :, None]
    return ((student.float() - teacher.float()) ** 2 * mask).sum() / (mask.sum() * teacher.shape[-1]).clamp(min=1)


def attention_mse(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """TinyBERT's L_attn: maps (B, H, T, T) of pre-dropout attention probabilities; mask (B, T).
        1/H Σ_heads MSE over real query x key pairs."""
    mask = attention_mask.to(torch.float32)
    pairs = (mask[:, :, None] * mask[:, None, :])[:, None]
    return ((student.float() - teacher.float()) ** 2 * pairs).sum() / (pairs.sum() * teacher.shape[1]).clamp(min=1)


def packed_hidden_mse(student: torch.Tensor, teacher: torch.Tensor, token_index: torch.Tensor,
                      projection: nn.Module | None = None) -> torch.Tensor:
    """hidden_mse with the teacher's states as the cache packs them: student (B, T, D_S);
    teacher (N, D_T), the batch's real tokens row by row; token_index (N,) their places in the
    flattened (B·T). The same value as hidden_mse over the batch's mask, without padding the
    teacher's states to (B, T, D_T) in the loader (a copy as large as reading them)."""
    chosen = student.reshape(-1, student.shape[-1])[token_index]
    if projection is not None:
        chosen = projection(chosen.float())
    return ((chosen.float() - teacher.float()) ** 2).sum() / max(teacher.numel(), 1)


def packed_attention_mse(student: torch.Tensor, teacher: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
    """attention_mse with the teacher's maps as the cache packs them: student (B, H, T, T);
    teacher (P,), each row's real (query, head, key) probabilities; pair_index (P,) their
    places in the flattened student maps. Σ over the P real pairs / P, which is attention_mse's
    1/H Σ_heads mean over real query x key pairs."""
    chosen = student.reshape(-1)[pair_index]
    return ((chosen.float() - teacher.float()) ** 2).sum() / max(teacher.numel(), 1)


def word_infonce(student_vectors: torch.Tensor, teacher_words: torch.Tensor, word_mask: torch.Tensor,
                 query_row: torch.Tensor, query_word: torch.Tensor, tau: float, similarity: str = "dot") -> torch.Tensor:
    """MMKD's L_XWCL (Li et al. 2022, eq. 1): each query q (Q, D), a masked word's student vector,
    against the teacher vectors of every word of its own sentence, teacher_words (B, W, D)
    with word_mask (B, W); query_row (Q,) its sentence, query_word (Q,) its word. Mean over
    queries of  -log exp(s(q, t_w)/τ) / Σ_w' exp(s(q, t_w')/τ),  s = dot (or cosine)."""
    if query_row.numel() == 0:
        return student_vectors.sum() * 0.0
    candidates = teacher_words[query_row].float()  # (Q, W, D)
    student_vectors = student_vectors.float()
    if similarity == "cosine":
        student_vectors, candidates = F.normalize(student_vectors, dim=-1), F.normalize(candidates, dim=-1)
    scores = torch.einsum("qd,qwd->qw", student_vectors, candidates) / tau
    scores = scores.masked_fill(~word_mask[query_row], float("-inf"))
    return F.cross_entropy(scores, query_word)


def normalized_squared_distance(student_prediction: torch.Tensor, teacher_projection: torch.Tensor) -> torch.Tensor:
    """MMKD's L_SentA (Li et al. 2022, eq. 2): (B, D) each; 1/B Σ_i ||q_i/|q_i| - z_i/|z_i|||²."""
    diff = F.normalize(student_prediction.float(), dim=-1) - F.normalize(teacher_projection.float(), dim=-1)
    return diff.pow(2).sum(-1).mean()


def structure_kl(student_prediction: torch.Tensor, teacher_projection: torch.Tensor, tau: float) -> torch.Tensor:
    """MMKD's L_StrucA (Li et al. 2022, eqs. 3-5): (B, D) each. With A = z zᵀ of the normalised
    teacher projections and Ã likewise of the student predictions,
        1/B Σ_i KL(softmax(A_i / τ) || softmax(Ã_i / τ))."""
    z = F.normalize(teacher_projection.float(), dim=-1)
    z_student = F.normalize(student_prediction.float(), dim=-1)
    target = torch.softmax(z @ z.T / tau, dim=-1)
    log_q = torch.log_softmax(z_student @ z_student.T / tau, dim=-1)
    return F.kl_div(log_q, target, reduction="batchmean")
