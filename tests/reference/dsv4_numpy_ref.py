#!/usr/bin/env python3
"""Independent NumPy reference ("oracle") for DeepSeek-V4 inference.

Implements the ONE-SHOT PREFILL path (start_pos = 0) of the official reference
`inference/model.py` + `inference/kernel.py`, as restated in
docs/dsv4-model-spec.md (/work/shared/docs/dsv4-model-spec.md). Every section of
this file cites the spec section it implements ("spec §x.y").

Numerics: activations are bf16 between modules. bf16 is emulated by float32
arrays that only ever hold bf16-exact values; `bf16()` rounds float32 to
bfloat16 (round-to-nearest-even on the upper 16 bits). FP8 e4m3 and FP4 e2m1
quantization are emulated exactly (RNE, power-of-two UE8M0 scales rounded UP).

Usage:
  python3 dsv4_numpy_ref.py --model DIR --tokens 0,17,42 --out logits.npy \
      [--mtp-out mtp_logits.npy] [--dump-hidden hidden.npz]

Writes float32 logits for EVERY position, shape [S, vocab]. With --mtp-out the
MTP block is run on the main model's final hyper-streams X[0..S-2] with the next
ids tokens[1..S-1] (positions 0..S-2); its logits have shape [S-1, vocab].

Dependencies: numpy only (an optimized BLAS, e.g. libopenblas0, makes the LM head
fast; the reference BLAS works but is slow for a 129280-row head).
"""
import argparse
import json
import math
import os
import struct
import sys
import time

import numpy as np

F32 = np.float32
NEG_INF = F32(-np.inf)

np.seterr(over="ignore", under="ignore", invalid="ignore", divide="ignore")


# =====================================================================================
# Spec §2 — primitive number formats
# =====================================================================================

def bf16(x):
    """Round float32 -> bfloat16 (RNE), returned as float32 holding a bf16-exact value."""
    x = np.ascontiguousarray(x, dtype=F32)
    u = x.view(np.uint32)
    r = ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    out = ((u + r) & np.uint32(0xFFFF0000)).view(F32)
    nan = np.isnan(x)
    if nan.any():
        out = np.where(nan, x, out)
    return out


F64 = np.float64


# Accumulation mode for every fp32 reduction except the LM head (see README):
#   "f64": evaluate in float64, round once to fp32 (order independent; default)
#   "seq": fp32 accumulation in ascending index order, acc = fp32(acc + fp32(a*b))
ACCUM = os.environ.get("DSV4_REF_ACCUM", "f64")
SEQ_OPS = set(filter(None, os.environ.get("DSV4_REF_SEQ_OPS", "").split(",")))


def _seq(op):
    return ACCUM == "seq" or op in SEQ_OPS


def mm(a, b, op=""):
    """fp32 result of the matmul a @ b (batched like np.matmul).
    "f64": evaluated in float64 and rounded once. Every product in this model (bf16 x
    bf16, bf16 x e4m3, bf16 x fp32) is exact in float64, so this is the (almost always)
    correctly rounded fp32 value of the exact sum, independent of summation order and
    batch shape ("any summation order", spec §2.7).
    "seq": sequential fp32 accumulation over k = 0..K-1."""
    if _seq(op):
        a = np.asarray(a, dtype=F32)
        b = np.asarray(b, dtype=F32)
        acc = None
        for k in range(a.shape[-1]):
            t = a[..., :, k:k + 1] * b[..., k:k + 1, :]
            acc = t if acc is None else (acc + t)
        return acc.astype(F32)
    return np.matmul(np.asarray(a, dtype=F64), np.asarray(b, dtype=F64)).astype(F32)


def rsum(x, axis, keepdims=False, op=""):
    """fp32 sum over one axis ("f64": float64 then rounded once; "seq": sequential fp32).
    A float64 input (exact products) is rounded to fp32 per term in "seq" mode."""
    if _seq(op):
        x = np.moveaxis(np.asarray(x).astype(F32), axis, 0)
        acc = x[0].copy()
        for i in range(1, x.shape[0]):
            acc = acc + x[i]
        return np.expand_dims(acc, axis) if keepdims else acc
    return np.asarray(x, dtype=F64).sum(axis=axis, keepdims=keepdims).astype(F32)


def exp32(x):
    """fp32 exp, correctly rounded (evaluated in float64)."""
    return np.exp(np.asarray(x, dtype=F64)).astype(F32)


def pow2_ceil(t):
    """2^ceil(log2 t), computed exactly from the float bits (spec §2.4: exponent+1 if
    the mantissa is non-zero). t > 0, float32."""
    m, e = np.frexp(np.asarray(t, dtype=F32))  # t = m * 2^e, m in [0.5, 1)
    c = np.where(m == F32(0.5), e - 1, e)
    return np.ldexp(F32(1.0), c).astype(F32)


def round_e4m3(v):
    """float32 -> nearest float8_e4m3fn value (RNE); input must already be clamped to
    [-448, 448]. Normal quantum 2^(floor(log2|v|)-3), subnormal quantum 2^-9."""
    v = np.asarray(v, dtype=F32)
    _, e = np.frexp(np.abs(v))  # floor(log2|v|) = e - 1
    q = np.ldexp(F32(1.0), np.maximum(e - 4, -9)).astype(F32)
    return (np.rint(v / q) * q).astype(F32)


def round_e2m1(v):
    """float32 -> nearest FP4 e2m1 value {0,.5,1,1.5,2,3,4,6} (RNE, ties to the even
    code); input must already be clamped to [-6, 6]."""
    v = np.asarray(v, dtype=F32)
    _, e = np.frexp(np.abs(v))
    q = np.ldexp(F32(1.0), np.maximum(e - 2, -1)).astype(F32)
    return (np.rint(v / q) * q).astype(F32)


def act_quant_dequant(x, block):
    """Spec §2.4 act_quant (FP8 e4m3, UE8M0 scale rounded up), returned dequantized
    (q * s, exact in fp32). Used for GEMM activations (block 128) and, after bf16
    rounding, for the in-place KV QAT simulation (block 64)."""
    shp = x.shape
    xb = x.reshape(*shp[:-1], shp[-1] // block, block)
    amax = np.maximum(np.abs(xb).max(axis=-1, keepdims=True), F32(1e-4))
    s = pow2_ceil(amax * F32(1.0 / 448.0))
    q = round_e4m3(np.clip(xb / s, F32(-448.0), F32(448.0)))
    return (q * s).reshape(shp)


def fp8_sim(x, block=64):
    """In-place act_quant variant: x <- bf16(e4m3(clamp(x/s)) * s) (spec §2.4)."""
    return bf16(act_quant_dequant(x, block))


def fp4_sim(x, block=32):
    """Spec §2.5 fp4_act_quant in-place variant: x <- bf16(e2m1(clamp(x/s)) * s)."""
    shp = x.shape
    xb = x.reshape(*shp[:-1], shp[-1] // block, block)
    amax = np.maximum(np.abs(xb).max(axis=-1, keepdims=True), F32(6.0 * 2.0 ** -126))
    s = pow2_ceil(amax * F32(1.0 / 6.0))
    q = round_e2m1(np.clip(xb / s, F32(-6.0), F32(6.0)))
    return bf16((q * s).reshape(shp))


def _e4m3_table():
    t = np.zeros(256, dtype=F32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        exp = (b >> 3) & 0xF
        man = b & 0x7
        if exp == 15 and man == 7:
            t[b] = np.nan
        elif exp == 0:
            t[b] = sign * man / 8.0 * 2.0 ** -6
        else:
            t[b] = sign * (1.0 + man / 8.0) * 2.0 ** (exp - 7)
    return t


E4M3_TABLE = _e4m3_table()
E2M1_TABLE = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=F32)


def e8m0_to_f32(b):
    b = np.asarray(b, dtype=np.uint8).astype(np.int32)
    out = np.ldexp(F32(1.0), b - 127).astype(F32)
    return np.where(b == 255, F32(np.nan), out)


# =====================================================================================
# Spec §8 — checkpoint reading (safetensors parsed by hand)
# =====================================================================================

class Checkpoint:
    """Lazily reads tensors from model.safetensors.index.json + shards (spec §8)."""

    def __init__(self, model_dir):
        self.dir = model_dir
        idx_path = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(idx_path):
            with open(idx_path) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        else:
            shards = sorted(p for p in os.listdir(model_dir) if p.endswith(".safetensors"))
        self.entries = {}
        self.maps = {}
        self._cache = {}
        for sh in shards:
            path = os.path.join(model_dir, sh)
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            self.maps[sh] = mm
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                a, b = info["data_offsets"]
                self.entries[name] = (sh, 8 + n + a, 8 + n + b, info["dtype"], info["shape"])

    def has(self, name):
        return name in self.entries

    def raw(self, name):
        sh, a, b, dt, shape = self.entries[name]
        buf = self.maps[sh][a:b]
        np_dt = {"BF16": np.uint16, "F32": np.float32, "I64": np.int64, "I32": np.int32,
                 "F8_E4M3": np.uint8, "F8_E8M0": np.uint8, "I8": np.uint8, "U8": np.uint8,
                 "F16": np.float16}[dt]
        return np.frombuffer(buf, dtype=np_dt).reshape(shape), dt

    def f32(self, name):
        """BF16 / F32 / F16 tensor as float32 (bf16 values are exact)."""
        key = ("f32", name)
        if key not in self._cache:
            self._cache[key] = self._f32(name)
        return self._cache[key]

    def _f32(self, name):
        arr, dt = self.raw(name)
        if dt == "BF16":
            return (arr.astype(np.uint32) << np.uint32(16)).view(F32)
        return arr.astype(F32)

    def int64(self, name):
        arr, _ = self.raw(name)
        return arr.astype(np.int64)

    def linear_weight(self, prefix):
        key = ("lw", prefix)
        if key not in self._cache:
            self._cache[key] = self._linear_weight(prefix)
        return self._cache[key]

    def _linear_weight(self, prefix):
        """Dequantized weight of `prefix.weight` as float32 [N, K].
        FP8 (spec §2.7/§8.5): W = e4m3(Wq) * 2^(S[n//128, k//128]-127).
        FP4 (spec §2.8): I8 [N, K/2], low nibble = even k, scale [N, K/32].
        BF16/F32: as is."""
        w, dt = self.raw(prefix + ".weight")
        if dt == "F8_E4M3":
            W = E4M3_TABLE[w]
            s = e8m0_to_f32(self.raw(prefix + ".scale")[0])
            N, K = W.shape
            S = np.repeat(np.repeat(s, 128, axis=0), 128, axis=1)[:N, :K]
            return (W * S).astype(F32)
        if dt in ("I8", "U8"):
            lo = E2M1_TABLE[w & 0x0F]
            hi = E2M1_TABLE[w >> 4]
            N, K2 = w.shape
            W = np.empty((N, 2 * K2), dtype=F32)
            W[:, 0::2] = lo
            W[:, 1::2] = hi
            s = e8m0_to_f32(self.raw(prefix + ".scale")[0])
            return (W * np.repeat(s, 32, axis=1)[:, :2 * K2]).astype(F32)
        return self.f32(prefix + ".weight")


# =====================================================================================
# Spec §1 — configuration
# =====================================================================================

class Config:
    def __init__(self, path):
        with open(path) as f:
            c = json.load(f)
        self.raw = c
        self.vocab = c["vocab_size"]
        self.dim = c["hidden_size"]
        self.n_layers = c["num_hidden_layers"]
        self.n_heads = c["num_attention_heads"]
        self.head_dim = c["head_dim"]
        self.rope_dim = c.get("qk_rope_head_dim", 64)
        self.q_lora_rank = c["q_lora_rank"]
        self.o_groups = c["o_groups"]
        self.o_lora_rank = c["o_lora_rank"]
        self.window = c["sliding_window"]
        self.compress_ratios = list(c.get("compress_ratios", []))
        self.compress_rope_theta = float(c.get("compress_rope_theta", 160000.0))
        self.rope_theta = float(c.get("rope_theta", 10000.0))
        rs = c.get("rope_scaling") or {}
        self.rope_factor = float(rs.get("factor", 1.0))
        self.original_seq_len = int(rs.get("original_max_position_embeddings", 0)) if rs else 0
        self.beta_fast = float(rs.get("beta_fast", 32))
        self.beta_slow = float(rs.get("beta_slow", 1))
        self.index_n_heads = c.get("index_n_heads", 64)
        self.index_head_dim = c.get("index_head_dim", 128)
        self.index_topk = c.get("index_topk", 512)
        self.n_experts = c["n_routed_experts"]
        self.n_activated = c["num_experts_per_tok"]
        self.moe_inter = c["moe_intermediate_size"]
        self.n_hash_layers = c.get("num_hash_layers", 0)
        self.route_scale = float(c.get("routed_scaling_factor", 1.0))
        self.swiglu_limit = float(c.get("swiglu_limit", 0.0))
        self.hc_mult = c.get("hc_mult", 4)
        self.hc_iters = c.get("hc_sinkhorn_iters", 20)
        self.hc_eps = float(c.get("hc_eps", 1e-6))
        self.norm_eps = float(c.get("rms_norm_eps", 1e-6))
        self.score_func = c.get("scoring_func", "sqrtsoftplus")

    def ratio(self, layer_id):
        """compress_ratios[i] (spec §1.2); index n_layers is the MTP block."""
        return self.compress_ratios[layer_id] if layer_id < len(self.compress_ratios) else 0


# =====================================================================================
# Spec §2.1 — RMSNorm
# =====================================================================================

def rsqrt32(v):
    """fp32 rsqrt as torch evaluates it: 1 / sqrt(v), each step rounded to fp32."""
    return (F32(1.0) / np.sqrt(np.asarray(v, dtype=F32))).astype(F32)


def rmsnorm(x, w, eps):
    """y = bf16(w * x * rsqrt(mean(x^2) + eps)), fp32 math, over the last dim."""
    x = x.astype(F32, copy=False)
    var = rsum(x * x, -1, keepdims=True, op="norm") / F32(x.shape[-1])
    return bf16(w * (x * rsqrt32(var + F32(eps))))


def head_rmsnorm_bf16(q, eps):
    """Weight-less per-head Q norm done IN BF16 arithmetic (spec §5.1, reference
    `q *= torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)` on a bf16 tensor)."""
    sq = bf16(q * q)
    mean = bf16(rsum(sq, -1, keepdims=True, op="headnorm") / F32(q.shape[-1]))
    r = bf16(rsqrt32(bf16(mean + F32(eps))))
    return bf16(q * r)


# =====================================================================================
# Spec §2.2 / §2.3 / §1.3 — RoPE
# =====================================================================================

# RoPE table precision (see README "Numerics"). The reference's precompute_freqs_cis
# works in fp32: f_i = 1/base^(2i/64) (+ YaRN blend) and the angle t*f_i are fp32.
#   "fp32"     (default): f_i (incl. the YaRN blend) evaluated in float64 and rounded
#              once to fp32 (the correctly rounded fp32 frequency); angle = fp32(t * f_i);
#   "fp32-pow": f_i evaluated step by step in fp32 (pow, 1/x, blend), as torch does;
#   "f64":     frequencies and angles kept in float64.
# cos/sin are always the correctly rounded fp32 values of the angle.
ROPE_MODE = os.environ.get("DSV4_REF_ROPE", "fp32")


def rope_inv_freqs(cfg, ratio):
    """Inverse frequencies of the layer's table (spec §1.3, §2.2):
    ratio 0 (and MTP): rope_theta, no YaRN; ratio > 0: compress_rope_theta + YaRN."""
    dim = cfg.rope_dim
    if ratio:
        base, orig = cfg.compress_rope_theta, cfg.original_seq_len
    else:
        base, orig = cfg.rope_theta, 0
    T = F32 if ROPE_MODE == "fp32-pow" else F64
    freqs = (T(1.0) / (T(base) ** (np.arange(0, dim, 2, dtype=T) / T(dim)))).astype(T)
    if orig > 0:
        def corr_dim(rot):
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(corr_dim(cfg.beta_fast)), 0)
        high = min(math.ceil(corr_dim(cfg.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=T) - T(low)) / T(high - low), T(0), T(1))
        smooth = (T(1) - ramp).astype(T)
        freqs = (freqs / T(cfg.rope_factor) * (T(1) - smooth) + freqs * smooth).astype(T)
    return freqs if ROPE_MODE == "f64" else freqs.astype(F32)


def rope_table(freqs, positions):
    """cos/sin [len(positions), Dr/2] of the angle t * f (an fp32 product unless
    ROPE_MODE == "f64"), each correctly rounded to fp32."""
    T = F64 if ROPE_MODE == "f64" else F32
    ang = (np.asarray(positions, dtype=T)[:, None] * np.asarray(freqs, dtype=T)[None, :]).astype(T)
    a64 = ang.astype(F64)
    return np.cos(a64).astype(F32), np.sin(a64).astype(F32)


def apply_rope(x, cos, sin, inverse=False):
    """Interleaved-pair rotation of the LAST Dr dims (spec §2.3); cos/sin must broadcast
    against x[..., 0::2] of the rope slice. Output bf16; nope dims untouched."""
    dr = 2 * cos.shape[-1]
    out = x.copy()
    a = x[..., -dr::2].astype(F32)
    b = x[..., -dr + 1::2].astype(F32)
    if inverse:  # multiply by conj(e^{i theta})
        ra = a * cos + b * sin
        rb = b * cos - a * sin
    else:
        ra = a * cos - b * sin
        rb = a * sin + b * cos
    out[..., -dr::2] = bf16(ra)
    out[..., -dr + 1::2] = bf16(rb)
    return out


# =====================================================================================
# Spec §2.6 — Hadamard rotate_activation
# =====================================================================================

_HAD = {}


def hadamard(x):
    """y = bf16((x @ H_d) * d^-1/2), Sylvester Walsh-Hadamard, fp32 math."""
    d = x.shape[-1]
    if d not in _HAD:
        H = np.ones((1, 1), dtype=F32)
        while H.shape[0] < d:
            H = np.block([[H, H], [H, -H]])
        _HAD[d] = H.astype(F32)
    return bf16(mm(x, _HAD[d], op="hadamard") * F32(d ** -0.5))


# =====================================================================================
# Spec §2.7 / §2.8 — FP8 / FP4 linear layers
# =====================================================================================

def q_linear(x, W):
    """Linear with an FP8 (or FP4) weight: activation act_quant'ed per 128 along K
    (spec §2.4), fp32 accumulation against the dequantized weight, output bf16."""
    xq = act_quant_dequant(x, 128)
    return bf16(mm(xq, W.T, op="qlinear"))


def bf16_linear(x, W):
    """Plain BF16 F.linear: fp32 accumulation, bf16 output."""
    return bf16(mm(x, W.T, op="bf16linear"))


# =====================================================================================
# Spec §4 — manifold-constrained hyper-connections
# =====================================================================================

def sigmoid(x):
    """fp32 sigmoid, evaluated in float64 and rounded once."""
    x = np.asarray(x, dtype=F64)
    return (1.0 / (1.0 + np.exp(-x))).astype(F32)


def hc_pre(X, fn, scale, base, cfg):
    """Spec §4.1. X [S, n, D] bf16 -> (x [S, D] bf16, post [S, n], comb [S, n, n])."""
    S, n, D = X.shape
    xf = X.reshape(S, n * D)
    r = rsqrt32(rsum(xf * xf, -1, keepdims=True, op="hcnorm") / F32(n * D) + F32(cfg.norm_eps))
    mixes = mm(xf, fn.T, op="hcmix") * r
    eps = F32(cfg.hc_eps)
    pre = sigmoid(mixes[:, :n] * scale[0] + base[:n]) + eps
    post = F32(2) * sigmoid(mixes[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb = mixes[:, 2 * n:].reshape(S, n, n) * scale[2] + base[2 * n:].reshape(n, n)
    # Sinkhorn: row softmax + eps, column normalize, then iters-1 (row, column) passes.
    comb = exp32(comb - comb.max(axis=-1, keepdims=True))
    comb = comb / rsum(comb, -1, keepdims=True, op="sinkhorn") + eps
    comb = comb / (rsum(comb, -2, keepdims=True, op="sinkhorn") + eps)
    for _ in range(cfg.hc_iters - 1):
        comb = comb / (rsum(comb, -1, keepdims=True, op="sinkhorn") + eps)
        comb = comb / (rsum(comb, -2, keepdims=True, op="sinkhorn") + eps)
    y = bf16(rsum(pre[:, :, None].astype(F64) * X, 1, op="hcsum"))
    return y, post.astype(F32), comb.astype(F32)


def hc_post(f, R, post, comb):
    """Spec §4.2: X'_j = bf16(post_j * f + sum_i comb[i, j] * R_i) (sum over FIRST index)."""
    mix = (comb[:, :, :, None].astype(F64) * R[:, :, None, :]).sum(axis=1)  # [S, j, D]
    return bf16((post[:, :, None].astype(F64) * f[:, None, :] + mix).astype(F32))


def hc_head(X, fn, scale, base, cfg):
    """Spec §4.3: y = bf16(sum_i (sigmoid(scale*mu_i + base_i) + eps) X_i)."""
    S, n, D = X.shape
    xf = X.reshape(S, n * D)
    r = rsqrt32(rsum(xf * xf, -1, keepdims=True, op="hcnorm") / F32(n * D) + F32(cfg.norm_eps))
    mixes = mm(xf, fn.T, op="hcmix") * r
    pre = sigmoid(mixes * scale + base) + F32(cfg.hc_eps)
    return bf16(rsum(pre[:, :, None].astype(F64) * X, 1, op="hcsum"))


# =====================================================================================
# Spec §5.3 — Compressor (one-shot prefill, closed form)
# =====================================================================================

def compressor_prefill(ck, pfx, x, ratio, d, cfg, freqs, rotate):
    """Returns the compressed rows [S // ratio, d] (bf16 values) for a start_pos = 0
    prefill of the normalized attention input x [S, D] (bf16).

    fp32 projections (BF16 weights used as fp32), score += ape, windows of `ratio`
    tokens; ratio 4 overlaps: candidates = previous window's FIRST half [0:d) (row 0:
    kv = 0, score = -inf) + current window's SECOND half [d:2d); per-feature softmax
    over candidates; kv = RMSNorm(bf16(pooled)); RoPE at position j*ratio; then
    main: FP8 sim (block 64) on [0:d-Dr); indexer (rotate): Hadamard + FP4 sim."""
    S = x.shape[0]
    n = S // ratio
    if n == 0:
        return np.zeros((0, d), dtype=F32)
    overlap = ratio == 4
    Wkv = ck.f32(pfx + ".wkv.weight")
    Wg = ck.f32(pfx + ".wgate.weight")
    ape = ck.f32(pfx + ".ape")
    xs = x[:n * ratio]
    kv = mm(xs, Wkv.T, op="cproj").reshape(n, ratio, -1)
    sc = (mm(xs, Wg.T, op="cproj").reshape(n, ratio, -1) + ape[None]).astype(F32)
    if overlap:
        ckv = np.zeros((n, 2 * ratio, d), dtype=F32)
        csc = np.full((n, 2 * ratio, d), NEG_INF, dtype=F32)
        ckv[:, ratio:] = kv[:, :, d:]
        csc[:, ratio:] = sc[:, :, d:]
        ckv[1:, :ratio] = kv[:-1, :, :d]
        csc[1:, :ratio] = sc[:-1, :, :d]
        kv, sc = ckv, csc
    m = sc.max(axis=1, keepdims=True)
    e = exp32(sc - m)
    p = e / rsum(e, 1, keepdims=True, op="cpool")
    pooled = rsum(kv.astype(F64) * p, 1, op="cpool")  # [n, d]
    out = rmsnorm(bf16(pooled), ck.f32(pfx + ".norm.weight"), cfg.norm_eps)
    cos, sin = rope_table(freqs, np.arange(n) * ratio)
    out = apply_rope(out, cos, sin)
    if rotate:
        out = fp4_sim(hadamard(out), 32)
    else:
        nope = d - cfg.rope_dim
        out[:, :nope] = fp8_sim(out[:, :nope], 64)
    return out


# =====================================================================================
# Spec §5.4 — Lightning indexer (CSA layers)
# =====================================================================================

def indexer_prefill(ck, pfx, x, qr, cos, sin, cfg, freqs):
    """Returns the selected compressed-row ids [S, min(index_topk, S//4)], -1 = none."""
    S = x.shape[0]
    Hi, Di = cfg.index_n_heads, cfg.index_head_dim
    ratio = 4
    q = q_linear(qr, ck.linear_weight(pfx + ".wq_b")).reshape(S, Hi, Di)
    q = apply_rope(q, cos[:, None, :], sin[:, None, :])
    q = fp4_sim(hadamard(q), 32)
    kI = compressor_prefill(ck, pfx + ".compressor", x, ratio, Di, cfg, freqs, rotate=True)
    n = kI.shape[0]
    k = min(cfg.index_topk, n)
    if k == 0:
        return np.zeros((S, 0), dtype=np.int64)
    # weights = weights_proj(x) * (Di^-0.5 * Hi^-0.5): bf16 linear, product rounded to bf16
    w = bf16_linear(x, ck.f32(pfx + ".weights_proj.weight"))
    w = bf16(w * F32(Di ** -0.5 * Hi ** -0.5))
    # index_score = einsum in bf16 (each per-head dot rounded), relu, * w (bf16), sum heads
    dots = bf16(mm(q, kI.T, op="idxdot"))  # [S, Hi, n]
    sc = bf16(np.maximum(dots, F32(0)) * w[:, :, None])
    score = bf16(rsum(sc, 1, op="idxsum"))  # [S, n]
    visible = (np.arange(S) + 1) // ratio
    mask = np.arange(n)[None, :] >= visible[:, None]
    score = np.where(mask, NEG_INF, score)
    # top-k, ties broken toward the lower row index (stable sort of -score)
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return np.where(order >= visible[:, None], -1, order).astype(np.int64)


# =====================================================================================
# Spec §5.5 — sparse attention with sink
# =====================================================================================

def sparse_attention(q, kv_all, idx, sink, chunk=256):
    """q [S, H, Dh] bf16, kv_all [N, Dh] bf16 (K == V), idx [S, K] (-1 = invalid).
    fp32 logits * Dh^-0.5; M = max over selected keys; P = exp(l - M);
    o = sum(bf16(P) v) / (sum(P) + exp(sink - M)), bf16."""
    S, H, Dh = q.shape
    scale = F32(Dh ** -0.5)
    out = np.empty_like(q)
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        ii = idx[s0:s1]
        valid = ii >= 0
        kv = kv_all[np.where(valid, ii, 0)]  # [c, K, Dh]
        logits = mm(q[s0:s1], kv.transpose(0, 2, 1), op="attnqk") * scale  # [c, H, K]
        logits = np.where(valid[:, None, :], logits, NEG_INF)
        M = logits.max(axis=-1, keepdims=True)
        P = exp32(logits - M)
        num = mm(bf16(P), kv, op="attnpv")  # [c, H, Dh]
        den = rsum(P, -1, op="attnden") + exp32(sink[None, :] - M[..., 0])
        out[s0:s1] = bf16(num / den[..., None])
    return out


# =====================================================================================
# Spec §5 — Attention layer (one-shot prefill)
# =====================================================================================

def attention_prefill(ck, pfx, x, positions, ratio, cfg):
    S = x.shape[0]
    H, Dh, Dr = cfg.n_heads, cfg.head_dim, cfg.rope_dim
    nope = Dh - Dr
    freqs = rope_inv_freqs(cfg, ratio)
    cos, sin = rope_table(freqs, positions)
    eps = cfg.norm_eps

    # §5.1 query path
    qr = rmsnorm(q_linear(x, ck.linear_weight(pfx + ".wq_a")), ck.f32(pfx + ".q_norm.weight"), eps)
    q = q_linear(qr, ck.linear_weight(pfx + ".wq_b")).reshape(S, H, Dh)
    q = head_rmsnorm_bf16(q, eps)
    q = apply_rope(q, cos[:, None, :], sin[:, None, :])

    # §5.2 window KV path
    kv = rmsnorm(q_linear(x, ck.linear_weight(pfx + ".wkv")), ck.f32(pfx + ".kv_norm.weight"), eps)
    kv = apply_rope(kv, cos, sin)
    kv[:, :nope] = fp8_sim(kv[:, :nope], 64)

    # §5.5 key sets. Window: tokens max(0, p-W+1) .. p.
    W = cfg.window
    p = np.arange(S)
    win = p[:, None] - (W - 1) + np.arange(W)[None, :]
    win = np.where(win >= 0, win, -1)
    idx = win
    kv_all = kv
    if ratio:
        comp = compressor_prefill(ck, pfx + ".compressor", x, ratio, Dh, cfg, freqs, rotate=False)
        n = comp.shape[0]
        visible = (p + 1) // ratio
        if ratio == 4:  # CSA: indexer top-k
            sel = indexer_prefill(ck, pfx + ".indexer", x, qr, cos, sin, cfg, freqs)
        else:  # HCA: all visible rows
            sel = np.broadcast_to(np.arange(n)[None, :], (S, n))
            sel = np.where(sel < visible[:, None], sel, -1)
        sel = np.where(sel >= 0, sel + S, -1)  # compressed rows follow the S window rows
        idx = np.concatenate([idx, sel], axis=1)
        kv_all = np.concatenate([kv, comp], axis=0)

    o = sparse_attention(q, kv_all, idx, ck.f32(pfx + ".attn_sink"))
    # §5.6 inverse RoPE at the query position, grouped wo_a (bf16 einsum, no act quant), wo_b
    o = apply_rope(o, cos[:, None, :], sin[:, None, :], inverse=True)
    G, Ro = cfg.o_groups, cfg.o_lora_rank
    wo_a = bf16(ck.linear_weight(pfx + ".wo_a")).reshape(G, Ro, -1)
    og = o.reshape(S, G, -1)
    z = bf16(mm(og.transpose(1, 0, 2), wo_a.transpose(0, 2, 1), op="woa").transpose(1, 0, 2))
    return q_linear(z.reshape(S, G * Ro), ck.linear_weight(pfx + ".wo_b"))


# =====================================================================================
# Spec §6 — MoE
# =====================================================================================

def softplus(x):
    """torch.nn.functional.softplus (beta 1, threshold 20)."""
    x64 = np.asarray(x, dtype=F64)
    return np.where(x > F32(20), x, np.log1p(np.exp(np.minimum(x64, 20.0)))).astype(F32)


def expert_forward(x, w1, w2, w3, weight, limit):
    """Spec §6.2 SwiGLU with clamp; routing weight applied before w2."""
    gate = q_linear(x, w1)
    up = q_linear(x, w3)
    if limit > 0:
        up = np.clip(up, F32(-limit), F32(limit))
        gate = np.minimum(gate, F32(limit))
    silu = (gate / (1.0 + np.exp(-gate.astype(F64)))).astype(F32)
    h = silu * up  # fp32
    if weight is not None:
        h = weight[:, None] * h
    return q_linear(bf16(h), w2)


def moe_forward(ck, pfx, x, token_ids, layer_id, cfg):
    S, D = x.shape
    # §6.1 router (fp32)
    Wg = ck.f32(pfx + ".gate.weight")
    scores = mm(x, Wg.T, op="gate")
    if cfg.score_func == "sqrtsoftplus":
        scores = np.sqrt(softplus(scores))
    elif cfg.score_func == "sigmoid":
        scores = sigmoid(scores)
    else:
        e = exp32(scores - scores.max(-1, keepdims=True))
        scores = e / rsum(e, -1, keepdims=True, op="gate")
    k = cfg.n_activated
    if layer_id < cfg.n_hash_layers:
        ids = ck.int64(pfx + ".gate.tid2eid")[token_ids]
    else:
        biased = scores + ck.f32(pfx + ".gate.bias")[None, :]
        ids = np.argsort(-biased, axis=1, kind="stable")[:, :k]  # ties -> lower expert id
    w = np.take_along_axis(scores, ids, axis=1)
    if cfg.score_func != "softmax":
        w = w / rsum(w, -1, keepdims=True, op="gate")
    w = (w * F32(cfg.route_scale)).astype(F32)
    # §6.2 routed experts
    outs = np.zeros((S, ids.shape[1], D), dtype=F32)
    for e in np.unique(ids):
        rows, slots = np.nonzero(ids == e)
        ep = f"{pfx}.experts.{int(e)}"
        outs[rows, slots] = expert_forward(
            x[rows], ck.linear_weight(ep + ".w1"), ck.linear_weight(ep + ".w2"),
            ck.linear_weight(ep + ".w3"), w[rows, slots], cfg.swiglu_limit)
    # fp32 accumulation in ASCENDING expert id order, then the shared expert, then bf16
    order = np.argsort(ids, axis=1, kind="stable")
    y = np.zeros((S, D), dtype=F32)
    ar = np.arange(S)
    for j in range(ids.shape[1]):
        y = y + outs[ar, order[:, j]]
    sp = pfx + ".shared_experts"
    y = y + expert_forward(x, ck.linear_weight(sp + ".w1"), ck.linear_weight(sp + ".w2"),
                           ck.linear_weight(sp + ".w3"), None, cfg.swiglu_limit)
    return bf16(y)


# =====================================================================================
# Spec §3 — block and top-level forward
# =====================================================================================

def block_forward(ck, pfx, X, positions, token_ids, layer_id, ratio, cfg):
    """Spec §3 Block: hc_pre -> attn_norm -> attention -> hc_post; same for MoE."""
    eps = cfg.norm_eps
    R = X
    x, post, comb = hc_pre(R, ck.f32(pfx + ".hc_attn_fn"), ck.f32(pfx + ".hc_attn_scale"),
                           ck.f32(pfx + ".hc_attn_base"), cfg)
    x = rmsnorm(x, ck.f32(pfx + ".attn_norm.weight"), eps)
    x = attention_prefill(ck, pfx + ".attn", x, positions, ratio, cfg)
    X = hc_post(x, R, post, comb)
    R = X
    x, post, comb = hc_pre(R, ck.f32(pfx + ".hc_ffn_fn"), ck.f32(pfx + ".hc_ffn_scale"),
                           ck.f32(pfx + ".hc_ffn_base"), cfg)
    x = rmsnorm(x, ck.f32(pfx + ".ffn_norm.weight"), eps)
    x = moe_forward(ck, pfx + ".ffn", x, token_ids, layer_id, cfg)
    return hc_post(x, R, post, comb)


def lm_head(ck, X, hc_pfx, norm_name, cfg, chunk=1024):
    """logits = fp32(norm(hc_head(X))) @ fp32(head)^T for every row (spec §3, §4.3)."""
    y = hc_head(X, ck.f32(hc_pfx + "hc_head_fn"), ck.f32(hc_pfx + "hc_head_scale"),
                ck.f32(hc_pfx + "hc_head_base"), cfg)
    y = rmsnorm(y, ck.f32(norm_name), cfg.norm_eps)
    Wh = ck.f32("head.weight")
    out = np.empty((y.shape[0], Wh.shape[0]), dtype=F32)
    for s0 in range(0, y.shape[0], chunk):
        out[s0:s0 + chunk] = y[s0:s0 + chunk] @ Wh.T
    return out


def embed(ck, ids):
    E, dt = ck.raw("embed.weight")
    rows = E[ids]
    if dt == "BF16":
        return (rows.astype(np.uint32) << np.uint32(16)).view(F32)
    return rows.astype(F32)


def forward_prefill(ck, cfg, tokens, dump=None):
    """One-shot prefill (start_pos = 0) over all tokens. Returns (logits [S, V],
    final hyper-streams X [S, n, D])."""
    tokens = np.asarray(tokens, dtype=np.int64)
    S = len(tokens)
    positions = np.arange(S)
    h = embed(ck, tokens)
    X = np.repeat(h[:, None, :], cfg.hc_mult, axis=1)  # 4 identical streams
    if dump is not None:
        dump["embed"] = X.copy()
    for l in range(cfg.n_layers):
        X = block_forward(ck, f"layers.{l}", X, positions, tokens, l, cfg.ratio(l), cfg)
        if dump is not None:
            dump[f"layer{l}"] = X.copy()
    logits = lm_head(ck, X, "", "norm.weight", cfg)
    return logits, X


def forward_mtp(ck, cfg, Xmain, next_ids):
    """Spec §3.1 MTP block over positions 0..len(next_ids)-1 (one-shot prefill)."""
    pfx = "mtp.0"
    S = len(next_ids)
    positions = np.arange(S)
    eps = cfg.norm_eps
    e = rmsnorm(embed(ck, next_ids), ck.f32(pfx + ".enorm.weight"), eps)
    xh = rmsnorm(Xmain, ck.f32(pfx + ".hnorm.weight"), eps)  # per stream
    ep = q_linear(e, ck.linear_weight(pfx + ".e_proj"))
    hp = q_linear(xh, ck.linear_weight(pfx + ".h_proj"))
    X = bf16(ep[:, None, :] + hp)
    L = cfg.n_layers
    X = block_forward(ck, pfx, X, positions, next_ids, L, cfg.ratio(L), cfg)
    return lm_head(ck, X, pfx + ".", pfx + ".norm.weight", cfg)


def parse_tokens(s):
    if os.path.exists(s):
        with open(s) as f:
            s = f.read()
    return [int(t) for t in s.replace(",", " ").split()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint dir (config.json + safetensors)")
    ap.add_argument("--tokens", required=True, help="comma/space separated ids, or a file holding them")
    ap.add_argument("--out", required=True, help="output .npy, float32 [S, vocab]")
    ap.add_argument("--mtp-out", help="output .npy for MTP logits, float32 [S-1, vocab]")
    ap.add_argument("--dump-hidden", help="optional .npz with the hyper-streams after every layer")
    ap.add_argument("--rope", choices=["fp32", "fp32-pow", "f64"], default=None,
                    help="RoPE table precision: fp32 = correctly rounded fp32 frequencies, fp32 "
                         "angles (default); fp32-pow = frequencies computed step by step in fp32 "
                         "like torch; f64 = frequencies and angles in float64 (env DSV4_REF_ROPE)")
    ap.add_argument("--accum", choices=["f64", "seq"], default=None,
                    help="fp32 reductions: f64 = exact then rounded once (default), seq = "
                         "sequential fp32 (env DSV4_REF_ACCUM)")
    args = ap.parse_args(argv)
    global ROPE_MODE, ACCUM
    if args.rope:
        ROPE_MODE = args.rope
    if args.accum:
        ACCUM = args.accum

    t0 = time.time()
    cfg = Config(os.path.join(args.model, "config.json"))
    ck = Checkpoint(args.model)
    tokens = parse_tokens(args.tokens)
    dump = {} if args.dump_hidden else None
    logits, X = forward_prefill(ck, cfg, tokens, dump)
    np.save(args.out, logits.astype(F32))
    msg = f"prefill S={len(tokens)} -> {args.out} {logits.shape}"
    if args.mtp_out:
        if len(tokens) < 2:
            sys.exit("--mtp-out needs at least 2 tokens")
        mtp = forward_mtp(ck, cfg, X[:-1], np.asarray(tokens[1:], dtype=np.int64))
        np.save(args.mtp_out, mtp.astype(F32))
        msg += f"; mtp -> {args.mtp_out} {mtp.shape}"
    if dump is not None:
        np.savez(args.dump_hidden, **dump)
    print(f"{msg}; {time.time() - t0:.2f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
