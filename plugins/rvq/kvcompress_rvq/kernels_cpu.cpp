// RVQ on the CPU (loaded by kvcompress_kernels.native), the C++ twins of kvcompress_rvq.kernels' torch references:
// rvq_encode_cpu (residual_encode_torch), rvq_lut_scores_cpu (lut_scores_torch) and rvq_lut_mix_cpu
// (lut_mix_torch), the last two for 8-bit codes (one byte per code: read in place).
//
// Encoding: every level of the residual coding of a block of vectors in one pass.
// The torch path writes each level's distance matrix [rows, codewords] to memory and reads it back to find the
// minimum; here a block of R rows is scored against CW codewords at a time in registers (each codeword load
// serves R rows), the running minimum kept per lane, so no distance ever leaves the core. Ranking as in the
// reference: ||c||^2 - 2 <r, c>, ties to the lowest index.
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
constexpr int R = 4;    // rows per block
constexpr int V = 4;    // vectors of 16 codewords per tile
constexpr int CW = 16 * V;

struct Args {
    int64_t rows, width, depth, size, padded;  // padded: size rounded up to a multiple of CW
    const float *vectors;                      // [rows, width]
    const float *transposed;                   // [depth, width, padded]: channel k of codeword c at [level][k][c]
    const float *norms;                        // [depth, padded]: ||c||^2, +inf on the padding
    const float *codebooks;                    // [depth, size, width]
    int64_t *codes;                            // [rows, depth]
    int64_t threads;
};

inline v16 load(const float *p) {
    v16 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

void encode_rows(const Args &a, int64_t begin, int64_t end) {
    const int64_t w = a.width, padded = a.padded;
    const i16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    std::vector<float> residual(R * w);
    for (int64_t start = begin; start < end; start += R) {
        const int live = end - start < R ? (int)(end - start) : R;
        for (int r = 0; r < R; r++)  // a dead slot repeats the block's last row (scored, never stored)
            std::memcpy(&residual[r * w], a.vectors + (start + (r < live ? r : live - 1)) * w, w * sizeof(float));
        for (int64_t level = 0; level < a.depth; level++) {
            const float *columns = a.transposed + level * w * padded;
            const float *norms = a.norms + level * padded;
            v16 best[R];
            i16 best_index[R];
            for (int r = 0; r < R; r++) {
                best[r] = v16{} + std::numeric_limits<float>::infinity();
                best_index[r] = i16{};
            }
            for (int64_t tile = 0; tile < padded; tile += CW) {
                v16 dot[R][V] = {};
                for (int64_t k = 0; k < w; k++) {
                    v16 c[V];
                    for (int j = 0; j < V; j++) c[j] = load(columns + k * padded + tile + 16 * j);
                    for (int r = 0; r < R; r++) {
                        const float x = residual[r * w + k];
                        for (int j = 0; j < V; j++) dot[r][j] += x * c[j];
                    }
                }
                for (int j = 0; j < V; j++) {
                    const v16 norm = load(norms + tile + 16 * j);
                    const i16 index = lanes + (int32_t)(tile + 16 * j);
                    for (int r = 0; r < R; r++) {
                        const v16 score = norm - 2.0f * dot[r][j];
                        const i16 better = score < best[r];  // strict: a lane keeps its earlier (lower) index
                        best[r] = better ? score : best[r];
                        best_index[r] = better ? index : best_index[r];
                    }
                }
            }
            for (int r = 0; r < live; r++) {
                float low = best[r][0];
                int32_t code = best_index[r][0];
                for (int l = 1; l < 16; l++)
                    if (best[r][l] < low || (best[r][l] == low && best_index[r][l] < code)) {
                        low = best[r][l];
                        code = best_index[r][l];
                    }
                a.codes[(start + r) * a.depth + level] = code;
                const float *codeword = a.codebooks + (level * a.size + code) * w;
                for (int64_t k = 0; k < w; k++) residual[r * w + k] -= codeword[k];
            }
        }
    }
}

struct LookupArgs {
    int64_t batch, heads, tokens, queries, slots, size;  // slots: codes per token (M), size: codewords (C)
    const uint8_t *codes;   // (b, h, t) row of M bytes at b * codes_b + h * codes_h + t * M
    int64_t codes_b, codes_h;
    const float *scale;     // [b, h, t]
    const float *tables;    // scores: [b, h, n, M, C] lookup tables
    const float *weights;   // mix: [b, h, n, t] attention weights
    float *out;             // scores: [b, h, n, t]; mix: [b, h, n, M * C] weight per codeword (zeroed by the caller)
};

}  // namespace

// Scores: out[b, h, q, t] = scale[t] * sum over slots m of tables[q, m, code_m(t)].
extern "C" void rvq_lut_scores_cpu(const LookupArgs *a) {
    const int64_t n = a->queries, slots = a->slots, size = a->size, t = a->tokens;
    for (int64_t b = 0; b < a->batch; b++)
        for (int64_t h = 0; h < a->heads; h++) {
            const int64_t bh = b * a->heads + h;
            const uint8_t *codes = a->codes + b * a->codes_b + h * a->codes_h;
            // one query's tables (M x C floats: 22 KB at 22 slots of 256) stay in L1 while every token is read
            for (int64_t q = 0; q < n; q++) {
                const float *table = a->tables + (bh * n + q) * slots * size;
                float *out = a->out + (bh * n + q) * t;
                for (int64_t tok = 0; tok < t; tok += 4) {  // four tokens' sums at once: independent chains of adds
                    const int live = t - tok < 4 ? (int)(t - tok) : 4;
                    const uint8_t *row = codes + tok * slots;
                    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    for (int64_t m = 0; m < slots; m++)
                        for (int k = 0; k < 4; k++) sum[k] += table[m * size + row[(k < live ? k : 0) * slots + m]];
                    for (int k = 0; k < live; k++) out[tok + k] = sum[k] * a->scale[bh * t + tok + k];
                }
            }
        }
}

// Mix: out[b, h, q, m * C + c] += weights[q, t] * scale[t] for every token t whose code in slot m is c.
extern "C" void rvq_lut_mix_cpu(const LookupArgs *a) {
    const int64_t n = a->queries, slots = a->slots, size = a->size, t = a->tokens;
    for (int64_t b = 0; b < a->batch; b++)
        for (int64_t h = 0; h < a->heads; h++) {
            const int64_t bh = b * a->heads + h;
            const uint8_t *codes = a->codes + b * a->codes_b + h * a->codes_h;
            for (int64_t q = 0; q < n; q++) {
                const float *weights = a->weights + (bh * n + q) * t;
                float *out = a->out + (bh * n + q) * slots * size;  // M x C floats: stays in L1 for every token
                for (int64_t tok = 0; tok < t; tok++) {
                    const float weight = weights[tok] * a->scale[bh * t + tok];
                    const uint8_t *row = codes + tok * slots;
                    for (int64_t m = 0; m < slots; m++) out[m * size + row[m]] += weight;
                }
            }
        }
}

// Codes [rows, depth] of `rows` vectors; rows split over `threads` threads.
extern "C" void rvq_encode_cpu(const Args *a) {
    const int64_t threads = a->threads > 1 && a->rows >= 256 * a->threads ? a->threads : 1;
    const int64_t share = ((a->rows + threads - 1) / threads + R - 1) / R * R;  // whole blocks; the last share is short
    std::vector<std::thread> workers;
    for (int64_t t = 1; t < threads; t++) {
        const int64_t begin = t * share, end = begin + share < a->rows ? begin + share : a->rows;
        if (begin < end) workers.emplace_back(encode_rows, std::cref(*a), begin, end);
    }
    encode_rows(*a, 0, share < a->rows ? share : a->rows);
    for (auto &worker : workers) worker.join();
}
