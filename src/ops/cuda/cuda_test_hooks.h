// The CUDA backend's test hooks, declared once for the files that define them and the
// tests that call them. Most come in pairs: a counter of the launches that took a form
// (so a test can see that the form it forces ran), and a force switch whose -1 follows the
// environment switch of the same form (`dsv4 env` lists those; tools/env_switches.h).
// Each force holds process-wide until reset: a test that forces one puts it back to -1
// (or its "follow the environment" value) before it returns.
#pragma once

#include <cstdint>

namespace dsv4::ops {

class CudaBackend;

// ---- graph capture (cuda_backend.cu) ----------------------------------------------------

// Which lane edges CudaBackend::capture makes programmatic, as DSV4_CUDA_PDL_LANES' words
// ("join", "fork", "chain", "all", "0"; "" as unset: chain or join by the capture's rows);
// nullptr follows the environment.
void cuda_force_pdl_lanes(const char* mode);

// ---- linears, routed experts, router; casts (cuda_linear.cu) -------------------------

// -1 follows DSV4_CUDA_KERNELS (the default), 0 forces the fast kernels, 1 the simple
// ones.
void cuda_linear_force_path(int path);
// Test hooks: FP4 expert GEMM launches so far that took their weights by TMA; -1
// follows DSV4_CUDA_TMA (the default), 0 forces the cp.async copies, 1 allows TMA.
int64_t cuda_linear_tma_launches();
void cuda_linear_force_tma(int on);
// Test hooks: launches so far of the routed experts' gate/up and down GEMMs as one
// (expert_ffn_fused_kernel); -1 follows DSV4_CUDA_FUSED_EXPERTS (default: automatic, up to 20 rows
// where the gate/up tiles fill the kernel's slots on the SMs), 0 / 1
// force it off / on (where the shapes allow it).
int64_t cuda_linear_fused_expert_launches();
void cuda_linear_force_fused_experts(int on);
// Tests: split fused expert launches so far (both GEMMs' K slices split over clusters of one
// size, expert_ffn_split_fused_kernel); -1 follows DSV4_CUDA_SPLIT_FUSED_EXPERTS (default
// off), 0 / 1 force it off / on where it applies.
int64_t cuda_linear_split_fused_expert_launches();
void cuda_linear_force_split_fused_experts(int on);
// Tests: routed-expert calls so far that ran as the two cluster launches chained by ready
// flags (expert_gate_up_ready_kernel, expert_down_ready_kernel); -1 follows
// DSV4_CUDA_EXPERT_READY_FLAGS (default off), 0 / 1 force it off / on where it applies.
int64_t cuda_linear_ready_flag_expert_launches();
void cuda_linear_force_ready_flag_experts(int on);
// Test hooks: expert GEMM launches so far; each expert GEMM of one K slice a CTA as
// `pieces` launches over its weight tiles (a diagnostic: what a launch boundary costs
// in the step; same bits), -1 following DSV4_CUDA_EXPERT_LAUNCHES (default 1).
int64_t cuda_linear_expert_launches();
void cuda_linear_force_expert_launches(int pieces);
// Test hook: -1 follows DSV4_CUDA_EXPERT_SPLIT (default: an expert GEMM splits its K
// slices over CTAs where its tiles are fewer than two an SM), 0 never splits, 1 automatic.
void cuda_linear_force_expert_split(int mode);
// Test hooks: FP4 expert GEMM launches so far in 16-row tiles (one weight decode for
// up to 16 rows); -1 follows DSV4_CUDA_SHARED_DECODE (the default), 0 / 1 force it off / on.
int64_t cuda_linear_shared_decode_launches();
void cuda_linear_force_shared_decode(int on);
// Test hooks: plain GEMM launches so far in wide tiles (gemm_wide_kernel); -1
// follows DSV4_CUDA_WIDE_GEMM (the default), 0 forces them off, 1 on for every FP8
// and bf16 plain GEMM of one group, whatever its rows (64-row tiles up to 64 rows),
// 2 on in 64-row tiles only, 3 as 1 but bf16 GEMMs of one K slice in 256-row tiles.
int64_t cuda_linear_wide_launches();
void cuda_linear_force_wide(int on);
// Test hooks: wide-tile launches so far by the warp-specialised kernel
// (gemm_wide_ws_kernel); -1 follows DSV4_CUDA_WIDE_WS (default 2), 0 forces it off,
// 1 on with one tile a CTA, 2 on with CTAs walking tiles (at most `max_ctas` of them,
// 0: one an SM).
int64_t cuda_linear_wide_ws_launches();
void cuda_linear_force_wide_ws(int mode, int max_ctas = 0);
// Test hook: -1 follows DSV4_CUDA_WIDE_WS_WO_A (default on), 0 / 1 force wo_a's
// FP8-as-bf16 wide tiles off / onto the warp-specialised kernel (in its mode).
void cuda_linear_force_wide_ws_wo_a(int on);
// Test hook: -1 follows DSV4_CUDA_WIDE_WS_BF16 (default on), 0 / 1 force bf16's 256-row
// tiles off / onto the warp-specialised kernel (in its mode).
void cuda_linear_force_wide_ws_bf16(int on);
// Test hooks: -1 follows DSV4_CUDA_WIDE_MC (default on), 0 / 1 force bf16's 256-row tiles
// off / onto the cluster kernel (gemm_wide_mc_kernel.cuh; in DSV4_CUDA_WIDE_WS's mode 2, where
// it fits); its launches so far.
void cuda_linear_force_wide_mc(int on);
int64_t cuda_linear_wide_mc_launches();
// Whether a cluster of two of the cluster kernel's CTAs fits on the backend's device.
bool cuda_linear_wide_mc_fits_device(CudaBackend& be);
// Test hooks: split_fold_kernel launches so far; the most partials (S x rows) a
// thread of a tile's last CTA folds in 8-, 16- and 32-row tiles: -1 follows
// DSV4_CUDA_LAST_CTA_FOLD_8ROW and DSV4_CUDA_LAST_CTA_FOLD (defaults kLastCtaFoldMax8Rows,
// kLastCtaFoldMax), 0 sends every such split to split_fold_kernel.
int64_t cuda_linear_fold_launches();
void cuda_linear_force_last_cta_fold(int max_partials);
// Test hooks: GEMM launches so far whose fold also wrote the output's FP8 codes
// (grouped_linear_linear); -1 follows DSV4_CUDA_FOLD_QUANT (default on), 0 / 1 force it off / on.
int64_t cuda_linear_fold_quant_launches();
void cuda_linear_force_fold_quant(int on);
// Test hooks: split GEMM launches so far folded by their clusters (gemm_kernel's kClusterFold);
// -1 follows DSV4_CUDA_CLUSTER_FOLD (default on; 0 turns it off), 0 / 1 force it off / on.
int64_t cuda_linear_cluster_fold_launches();
void cuda_linear_force_cluster_fold(int on);
// Test hook: whether a 16-row tile of at most 8 rows folds its slices in
// half-width, twice-deeper slabs; -1 follows DSV4_CUDA_FOLD_HALF_ROWS (default on), 0 / 1 force it.
void cuda_linear_force_fold_half_rows(int on);
// Test hooks: routed-expert GEMM launches so far folded by their clusters
// (expert_gemm_kernel's kClusterFold); -1 follows DSV4_CUDA_EXPERT_CLUSTER_FOLD (default on;
// 0 turns it off), 0 / 1 force it off / on.
int64_t cuda_linear_expert_cluster_fold_launches();
void cuda_linear_force_expert_cluster_fold(int on);
// Test hooks: routed-expert down GEMM calls so far that read their tile list and first
// weight stages before the dependency wait (GemmParams::weights_before_wait); -1 follows
// DSV4_CUDA_EXPERT_EARLY_WEIGHTS (default: where the SwiGLU launch releases the GEMM
// early; 0 never, 1 always), 0 / 1 force it off / on.
int64_t cuda_linear_expert_early_weight_launches();
void cuda_linear_force_expert_early_weights(int on);
// Test hooks: split FP4 expert GEMM calls so far whose slices copy their row scales a
// group at a time (GemmParams::split_scale_groups); -1 follows DSV4_CUDA_SPLIT_SCALE_GROUPS
// (default on; 0 turns it off), 0 / 1 force it off / on.
int64_t cuda_linear_split_scale_group_launches();
void cuda_linear_force_split_scale_groups(int on);
// Test hooks: router launches so far whose select kernel folded the GEMM's partials;
// -1 follows DSV4_CUDA_ROUTER_FOLD (default on; 0 turns it off), 0 / 1 force it off / on.
int64_t cuda_linear_router_folds();
void cuda_linear_force_router_fold(int on);
// Test hook: -1 follows DSV4_CUDA_ROUTER_EARLY (default on), 0 / 1 force the select
// kernel's late / early form.
void cuda_linear_force_router_early(int on);
// Test hook: -1 follows DSV4_CUDA_ROUTER_RANK (default: by rank where the select does not fold
// the GEMM's partials), 0 / 1 force the select's k rounds on warp 0 / its top k by rank.
void cuda_linear_force_router_rank(int on);
// Test hooks: router calls so far whose GEMM and select ran as one launch
// (router_gemm_select_kernel); -1 follows DSV4_CUDA_ROUTER_ONE_LAUNCH_ROWS (default 0: two
// launches), 0 .. 16 force the row bound.
int64_t cuda_linear_router_one_launches();
void cuda_linear_force_router_one_launch_rows(int rows);
// Test hooks: -1 follows DSV4_CUDA_PREP_WARP (default on), 0 / 1 force moe_prep_kernel's tile
// list by its block's counting sort / by one warp where the pairs fit one; launches so far that
// took the warp.
void cuda_linear_force_prep_warp(int on);
int64_t cuda_linear_prep_warp_launches();
// Test hook: moe_prep_kernel's block size (256, 512 or 1024; 0 follows DSV4_CUDA_PREP_THREADS).
void cuda_linear_force_prep_threads(int threads);
// Test hooks: act_quant8 / swiglu_quant8 launches so far; -1 follows DSV4_CUDA_QUANT8
// (default on; 0 turns them off), 0 / 1 force them off / on.
int64_t cuda_linear_quant8_launches();
void cuda_linear_force_quant8(int on);
// Test hook: floats x (all 2^32 bit patterns, in each of the 4 byte positions) whose
// hardware e4m3 cast (e4m3x4_sat) differs from core::float_to_e4m3 of the clamp;
// the first such bit pattern in *first.
int64_t cuda_e4m3_cast_mismatches(uint32_t* first);
int64_t cuda_e4m3_decode_mismatches(uint32_t* first);
// Test hook: floats x (all 2^32 bit patterns) whose device core::float_to_bf16 or
// round_bf16 differs from the integer rounding (core::float_to_bf16_bits).
int64_t cuda_bf16_cast_mismatches(uint32_t* first);
// Test hook: e4m3 code pairs (no NaN code) whose FP8-as-bf16 decode differs from the bf16
// of core::e4m3_to_float; the first such pair in *first.
int64_t cuda_e4m3_bf16_decode_mismatches(uint32_t* first);

// ---- norms, RoPE, mHC (cuda_pointwise.cu) --------------------------------------------

// Tests: -1 follows DSV4_CUDA_NORM_EARLY (default on), 0 / 1 force rms_norm's and
// rms_norm_linear's norm kernels to their late / early form (the early one where a row is
// at most 4096 values); how many launches took the early form.
void cuda_force_norm_early(int on);
int64_t cuda_norm_early_launches();

// Tests: -1 the rule (hc_launch), 0 / 1 hc_mix_rows_kernel off / on for every launch
// without an hc_post source; and how many launches took it. Its parts a row (1, 2, 4;
// 0: DSV4_CUDA_HC_ROW_SPLIT's).
void cuda_hc_force_row_mix(int on);
int64_t cuda_hc_row_mix_launches();
void cuda_hc_force_row_split(int parts);
// Tests: -1 the rule (hc_fused), 0 / 1 the fused mHC kernel off / up to 16 rows; and how
// many launches took it. The rows up to which the mix sums MoE slots (-1: the rule).
void cuda_hc_force_fused(int on);
int64_t cuda_hc_fused_launches();
// -1 the rule (hc_cluster), 0 / 1 the mHC mix and finish by one cluster off / up to 2 rows
// (where the shape and the GPU allow it); how many launches took it.
void cuda_hc_force_cluster(int on);
int64_t cuda_hc_cluster_launches();
void cuda_hc_force_slot_rows(int rows);
// -1 the environment's choice, 0 / 1 HcHandOver::quick off / on.
void cuda_hc_force_quick_hand_over(int on);
// -1 the environment's choice (or the rule by rows), 1 / 2 finishers a row in the fused mHC launch
// (HcHandOver::parts).
void cuda_hc_force_row_finishers(int n);
// How many fused mHC launches took two finishers a row.
int64_t cuda_hc_two_finisher_launches();
// -1 the environment's choice, 0 / 1 hc_post_slots_kernel off / on; how many launches took it.
void cuda_hc_force_post_slots(int on);
int64_t cuda_hc_post_slots_launches();

// ---- compressors, indexer, sparse attention (cuda_attention.cu) ----------------------

// 1 / 0: the simple or fast kernels of cuda_attention.cu (overrides DSV4_CUDA_KERNELS).
void cuda_attention_use_simple_kernels(bool simple);
// false keeps each row of the fast attention in one CTA.
void cuda_attention_split_keys(bool enabled);
// -1 follows DSV4_CUDA_ATTN_WGMMA (default on), 0 / 1 force the wgmma sparse attention off / on; its
// launches so far, and those of them that split rows over CTAs.
void cuda_attention_use_wgmma(int mode);
int64_t cuda_attention_wgmma_launches();
int64_t cuda_attention_wgmma_split_launches();
// n > 0 splits a row over min(n, segments) CTAs where a split is taken (0: the cost model's choice).
void cuda_attention_force_split_ctas(int n);
// -1 follows DSV4_CUDA_ATTN_LEAD_FOLD, 0 / 1 force the lead fold off / on.
void cuda_attention_force_lead_fold(int mode);
// -1 follows DSV4_CUDA_ATTN_EARLY, 0 / 1 force the kernels' late / early form.
void cuda_attention_force_early(int mode);
// -1 follows DSV4_CUDA_ATTN_FOLD_REGS, 0 / 1 force the wgmma kernel's register fold (one CTA a row:
// the fold state in registers, P.V an m64 tile at a time) off / on; its launches so far.
void cuda_attention_force_fold_regs(int mode);
int64_t cuda_attention_wgmma_fold_regs_launches();
// -1 follows DSV4_CUDA_ATTN_PAIR, 0 / 1 force the wgmma kernel's pair form (a row's dims over a cluster of
// two CTAs) off / on; its launches so far.
void cuda_attention_force_pair(int mode);
int64_t cuda_attention_wgmma_pair_launches();
// 64-row pages a top-k scoring CTA takes (0: sized to the grid).
void cuda_indexer_score_pages(int pages);
// compress_emit_kernel's CTAs a row (capped at one a 32-feature chunk; 0: the launcher's choice,
// ops/cuda/compress_emit_plan.h).
void cuda_compress_emit_ctas(int ctas);
// -1 follows DSV4_CUDA_SCORE_EARLY, 0 / 1 force the scoring kernel's early form; the same for the
// selection kernel (DSV4_CUDA_SELECT_EARLY).
void cuda_indexer_score_early(int mode);
void cuda_indexer_select_early(int mode);
// Mismatches of the keys' e4m3 decode over every code pair and scale byte; the first in *first.
int64_t cuda_attention_key_decode_mismatches(uint32_t* first);

// ---- one tensor-core step on the hardware (cuda_mma_probe.cu) ------------------------

// Per block b: D = A B + C with A [64][16] bf16 (row-major), B [8][16] bf16 (column n
// holds k contiguously), C and D [64][8] fp32, computed once by mma.sync (warp w the
// rows 16w..16w+15) into d_mma and once by one warpgroup wgmma into d_wgmma. Host
// pointers; `blocks` blocks.
void cuda_bf16_mma_probe(const uint16_t* a, const uint16_t* b, const float* c, int64_t blocks, float* d_mma,
                         float* d_wgmma);

// Per block b: D = C + sum over `chunks` k32 chunks of A_j B_j^T, A [64][32 * chunks]
// e4m3 codes (row-major), B [8][32 * chunks], C and D [64][8] fp32: one warpgroup's
// wgmma m64n8k32 e4m3 per chunk, both operands from 128-byte-swizzled shared memory as
// the FP8 GEMM stages them (chunk j at byte 32 j of each 128-byte row), the first
// onto C, each next onto the last (scale-d 1): the tensor core's running sum, which
// the kernels do not use yet (each of their chunks starts from zero). chunks <= 4.
void cuda_e4m3_mma_probe(const uint8_t* a, const uint8_t* b, const float* c, int64_t blocks, int chunks, float* d);

// Per block b: one 64-wide stage of the FP8-as-bf16 GEMM (`wo_a`) on one warpgroup, four
// chained k16 steps onto C: D = C + sum_j A_j B_j, A [64][64] e4m3 codes (row-major), B
// [8][64] bf16 (row n holds k contiguously), C and D [64][8] fp32; computed twice:
// d_bf16 with A as its exact bf16 values (a_bf16, from the host) and B as is (wgmma
// bf16, the kernels' form), and d_f16 with A by cvt.rn.f16x2.e4m3x2 and B x 2^s[n]
// (and C x 2^s[n]) as f16 (wgmma f16), the result x 2^-s[n]. The caller keeps every B
// x 2^s[n] exact in f16. The question it answers: is an f16 step the bf16 step on the
// same values (docs/design/cuda-linear.md, "An f16 stage for wo_a")?
void cuda_f16_stage_probe(const uint8_t* a_codes, const uint16_t* a_bf16, const uint16_t* b, const int* s,
                          const float* c, int64_t blocks, float* d_bf16, float* d_f16);

// ---- token choice (cuda_token_choice.cu) ----------------------------------------------

// Test hooks: choose_tokens and token_logprobs launches so far whose radix histograms took
// bin updates of form `bin_updates` (0 a shared atomic a key, 1 a thread's keys of a bin summed in
// registers in every pass, 2 summed in the weighed passes only); the forced form: -1 follows
// DSV4_CUDA_CHOOSE_AGGREGATE (0, 1, or unset: 2), 0..2 force one.
int64_t cuda_choose_launches(int bin_updates);
void cuda_choose_force_bin_updates(int form);
// Test hooks: choose_tokens and token_logprobs launches so far with `ctas` CTAs a row (1, 2, 4 or
// 8; a cluster a row where more than one); the forced count: -1 follows DSV4_CUDA_CHOOSE_CTAS
// (default: up to 8, the most whose clusters for every row are resident at once), 1..8 force one.
int64_t cuda_choose_row_ctas_launches(int ctas);
void cuda_choose_force_row_ctas(int ctas);

}  // namespace dsv4::ops
