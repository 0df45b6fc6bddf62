/* A whole decode step of a Llama-family or Gemma 3 decoder in one call: for every layer, add + RMSNorm,
 * the packed qkv projection, q/k norms + RoPE + cache write, paged decode attention (sliding window,
 * soft-cap), o projection, add + RMSNorm, gate/up, act * up, down; then the final norm. Gemma's sandwich
 * norms normalize a block's output before its residual add (the add_rmsnorm kernel's post weight).
 *
 * It calls exactly the kernels the per-op path calls, with the same dtypes in the same order, so a
 * sequence's numbers are the same whether it decodes here or in a mixed prefill/decode step. What it
 * saves is the Python between them: ~9 calls per layer through ctypes, each a few microseconds of
 * argument checks, tensor allocations and module dispatch (a third of a single-stream step). */
#include <stdint.h>
#include <stdlib.h>

void ember_add_rmsnorm(float *x, const uint16_t *delta_bf16, const float *post_w, const float *w, float eps,
                       int64_t t, int64_t d, uint16_t *out_bf16, float *out_f32);
void ember_rope_store(uint16_t *qkv, int64_t t, int64_t nq, int64_t nkv, int64_t dh, int64_t half,
                      const float *cos_t, const float *sin_t, const float *q_norm, const float *k_norm, float eps,
                      uint16_t *kc, uint16_t *vc, int64_t s_slots, const int64_t *slots);
void ember_act_mul(const uint16_t *gu, uint16_t *out, int64_t t, int64_t inter, int act);
void ember_decode_attention(const uint16_t *q, int64_t q_stride, const uint16_t *kc, const uint16_t *vc,
                            int64_t s_slots, const int64_t *slots, const int64_t *table_of, const int64_t *lens,
                            int64_t max_n, int64_t b, int64_t h, int64_t hkv, int64_t dh, float scale,
                            int64_t window, float softcap, uint16_t *out);
void ember_qtile_matmul(const uint8_t *codes, int64_t mode, const uint16_t *s16, const uint16_t *o16,
                        const void *x, int64_t x_f32, int64_t m_rows, int64_t n, int64_t k, float *y_f32,
                        uint16_t *y_bf16, int64_t use_amx);
void ember_bf16_matmul(const uint16_t *tiles, const void *x, int64_t x_f32, int64_t m_rows, int64_t n, int64_t k,
                       float *y_f32, uint16_t *y_bf16);

enum { BF16_TILES = 1 << 12 };  /* a qlinear's mode flag: bf16 tiles (bf16tile.c) at `codes`, no scales */

typedef struct {  /* one packed linear (ember/quant/packed.py) or bf16 tiles (ember/quant/bf16tile.py) */
    const uint8_t *codes;
    const uint16_t *s16, *o16;
    int64_t mode;  /* qtile's mode flags, or BF16_TILES */
} qlinear;

typedef struct {  /* mirrored by ember/models/decode_step.py */
    const float *in_norm, *mlp_norm, *q_norm, *k_norm;  /* fp32; q/k norms may be NULL */
    const float *attn_out_norm, *mlp_out_norm;  /* Gemma's sandwich norms of a block's output, or NULL */
    qlinear qkv, o, gate_up, down;
    uint16_t *kc, *vc;  /* [nkv, s_slots, dh] bf16 */
    int64_t window, rope;  /* sliding window (0: none); which cos/sin table */
} dec_layer;

typedef struct {
    int64_t layers, d, nq, nkv, dh, inter, half, s_slots, amx_rows, act;
    float eps, qk_eps, scale, softcap;
} dec_dims;

static void linear(const qlinear *w, const void *x, int x_f32, int64_t t, int64_t n, int64_t k, int64_t amx_rows,
                   uint16_t *y) {
    if (w->mode & BF16_TILES) ember_bf16_matmul((const uint16_t *)w->codes, x, x_f32, t, n, k, NULL, y);
    else ember_qtile_matmul(w->codes, w->mode, w->s16, w->o16, x, x_f32, t, n, k, NULL, y, t > amx_rows);
}

/* x [T, D] fp32 residual stream (in place) -> out [T, D] fp32 final-normed hidden states. One query per
 * sequence: rope[2 * table] / rope[2 * table + 1] = cos / sin [T, half], slots [T] (where the new k/v go),
 * dslots [T, max_n] and dlens [T] (each sequence's cache slots). amx_rows: more rows than this take AMX in
 * the matmul (same result). act: 0 SiLU, 1 tanh-GELU. */
void ember_decode_step(const dec_layer *L, const dec_dims *c, float *x, const float *const *rope,
                       const int64_t *slots, const int64_t *dslots, const int64_t *dlens, int64_t max_n,
                       int64_t t, const float *final_norm, float *out) {
    const int64_t nqkv = (c->nq + 2 * c->nkv) * c->dh, nattn = c->nq * c->dh;
    float *h = malloc(sizeof(float) * t * c->d);
    uint16_t *qkv = malloc(2 * t * nqkv), *att = malloc(2 * t * nattn), *delta = malloc(2 * t * c->d);
    uint16_t *gu = malloc(4 * t * c->inter), *act = malloc(2 * t * c->inter);
    const uint16_t *pending = NULL;  /* the previous layer's output, added by this layer's first norm */
    const float *pending_norm = NULL;  /* and its sandwich norm */
    for (int64_t l = 0; l < c->layers; l++) {
        const dec_layer *w = L + l;
        ember_add_rmsnorm(x, pending, pending_norm, w->in_norm, c->eps, t, c->d, NULL, h);
        linear(&w->qkv, h, 1, t, nqkv, c->d, c->amx_rows, qkv);
        ember_rope_store(qkv, t, c->nq, c->nkv, c->dh, c->half, rope[2 * w->rope], rope[2 * w->rope + 1], w->q_norm,
                         w->k_norm, c->qk_eps, w->kc, w->vc, c->s_slots, slots);
        ember_decode_attention(qkv, nqkv, w->kc, w->vc, c->s_slots, dslots, NULL, dlens, max_n, t, c->nq, c->nkv,
                               c->dh, c->scale, w->window, c->softcap, att);
        linear(&w->o, att, 0, t, c->d, nattn, c->amx_rows, delta);
        ember_add_rmsnorm(x, delta, w->attn_out_norm, w->mlp_norm, c->eps, t, c->d, NULL, h);
        linear(&w->gate_up, h, 1, t, 2 * c->inter, c->d, c->amx_rows, gu);
        ember_act_mul(gu, act, t, c->inter, (int)c->act);
        linear(&w->down, act, 0, t, c->d, c->inter, c->amx_rows, delta);
        pending = delta;
        pending_norm = w->mlp_out_norm;
    }
    ember_add_rmsnorm(x, pending, pending_norm, final_norm, c->eps, t, c->d, NULL, out);
    free(h);
    free(qkv);
    free(att);
    free(delta);
    free(gu);
    free(act);
}
