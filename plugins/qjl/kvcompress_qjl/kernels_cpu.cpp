// QJL attention scores on the CPU, read straight from the packed sign bits (the C++ twin of
// kvcompress_qjl.kernels.qjl_scores_torch; loaded by kvcompress_kernels.native).
//
// For each (sequence, KV head) and each group of `group` tokens (which share their outlier channels), the
// group's query sketches are built once and stay in L1:
//   u_in[q]  = scale/m  * (S q - sum over the group's outlier channels c of q[c] S[:, c])   (= scale/m  S q_in)
//   u_out[q] = scale/m' * (sum over those channels of q[c] S[:m', c])                        (= scale/m' S' q_out)
// and a token's score is ||k_in|| <u_in, sign(S k_in)> + ||k_out|| <u_out, sign(S' k_out)>. Each sign byte
// becomes eight +1/-1 floats through a 256-row table; TB tokens are scored at once so that TB x N independent
// sums hide the latency of the multiply-adds.
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));
constexpr int TB = 4;

struct SignRows {
    v8 rows[256];
    SignRows() {
        for (int byte = 0; byte < 256; byte++)
            for (int bit = 0; bit < 8; bit++) rows[byte][bit] = (byte >> bit) & 1 ? 1.0f : -1.0f;
    }
};
const SignRows SIGNS;

inline float total(v8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// acc[k][q] = <u[q], signs of token k> for `live` <= TB tokens `stride` bytes apart; u is [N, 8 * nbytes]
template <int N>
inline void signed_dots(const uint8_t *signs, int64_t stride, int live, int nbytes, const float *u, float acc[TB][N]) {
    v8 sum[TB][N];
    for (int k = 0; k < TB; k++)
        for (int q = 0; q < N; q++) sum[k][q] = v8{};
    const int64_t rows = 8 * (int64_t)nbytes;
    for (int j = 0; j < nbytes; j++) {
        v8 w[N];
        for (int q = 0; q < N; q++) std::memcpy(&w[q], u + q * rows + 8 * j, sizeof(v8));
        for (int k = 0; k < TB; k++) {
            const v8 s = SIGNS.rows[signs[(k < live ? k : 0) * stride + j]];  // a dead slot rereads token 0
            for (int q = 0; q < N; q++) sum[k][q] += s * w[q];
        }
    }
    for (int k = 0; k < TB; k++)
        for (int q = 0; q < N; q++) acc[k][q] = total(sum[k][q]);
}

struct Args {
    int64_t batch, heads, tokens, head_dim, group, m, m_out, outliers;
    const float *query;     // [b, h, N, d]
    const float *sketched;  // [b, h, N, m]: S q
    const float *sketch_t;  // [d, m]: row c is channel c's sketch column
    const uint8_t *signs;   // token rows of m/8 bytes: (b, h, t) at b * signs_b + h * signs_h + t * m/8
    int64_t signs_b, signs_h;
    const float *norm;      // [b, h, t]
    const uint8_t *outlier_signs;  // token rows of m'/8 bytes, strides like signs
    int64_t outlier_signs_b, outlier_signs_h;
    const float *outlier_norm;     // [b, h, t]
    const uint8_t *outlier_index;  // (b, h, group g) at b * index_b + h * index_h + g * outliers
    int64_t index_b, index_h;
    float scale_in, scale_out;  // scale / m, scale / m'
    float *out;                 // [b, h, N, t]
};

template <int N>
void scores(const Args &a) {
    const int64_t m = a.m, mo = a.m_out, d = a.head_dim, t = a.tokens;
    const int64_t group = a.outliers ? a.group : (t ? t : 1);
    std::vector<float> u_in(N * m), u_out(N * (mo ? mo : 1));
    float inlier[TB][N], outlier[TB][N];
    for (int64_t b = 0; b < a.batch; b++) {
        for (int64_t h = 0; h < a.heads; h++) {
            const int64_t bh = b * a.heads + h;
            const float *query = a.query + bh * N * d;
            const float *sketched = a.sketched + bh * N * m;
            const uint8_t *signs = a.signs + b * a.signs_b + h * a.signs_h;
            const uint8_t *osigns = a.outliers ? a.outlier_signs + b * a.outlier_signs_b + h * a.outlier_signs_h : nullptr;
            const float *norm = a.norm + bh * t;
            const float *onorm = a.outliers ? a.outlier_norm + bh * t : nullptr;
            float *result = a.out + bh * N * t;
            for (int64_t start = 0; start < t; start += group) {
                const uint8_t *channels =
                    a.outliers ? a.outlier_index + b * a.index_b + h * a.index_h + (start / group) * a.outliers : nullptr;
                for (int q = 0; q < N; q++) {
                    // w = S q_out, 8 rows at a time over the group's outlier columns, kept in a register
                    for (int64_t r = 0; r < m; r += 8) {
                        v8 w = v8{};
                        for (int64_t o = 0; o < a.outliers; o++) {
                            v8 column;
                            std::memcpy(&column, a.sketch_t + channels[o] * m + r, sizeof(v8));
                            w += query[q * d + channels[o]] * column;
                        }
                        v8 full;
                        std::memcpy(&full, sketched + q * m + r, sizeof(v8));
                        const v8 scaled_in = (full - w) * a.scale_in, scaled_out = w * a.scale_out;
                        std::memcpy(&u_in[q * m + r], &scaled_in, sizeof(v8));
                        if (r < mo) std::memcpy(&u_out[q * mo + r], &scaled_out, sizeof(v8));
                    }
                }
                const int64_t stop = start + group < t ? start + group : t;
                for (int64_t tok = start; tok < stop; tok += TB) {
                    const int live = stop - tok < TB ? (int)(stop - tok) : TB;
                    signed_dots<N>(signs + tok * (m / 8), m / 8, live, (int)(m / 8), u_in.data(), inlier);
                    if (a.outliers) signed_dots<N>(osigns + tok * (mo / 8), mo / 8, live, (int)(mo / 8), u_out.data(), outlier);
                    for (int k = 0; k < live; k++)
                        for (int q = 0; q < N; q++)
                            result[q * t + tok + k] = inlier[k][q] * norm[tok + k] + (a.outliers ? outlier[k][q] * onorm[tok + k] : 0.0f);
                }
            }
        }
    }
}

}  // namespace

// Returns 0, or -1 when the query count is outside 1..8 (kernels.NATIVE_QUERIES; the caller keeps its torch path).
extern "C" int qjl_scores_cpu(const Args *a, int queries) {
    switch (queries) {
        case 1: scores<1>(*a); return 0;
        case 2: scores<2>(*a); return 0;
        case 3: scores<3>(*a); return 0;
        case 4: scores<4>(*a); return 0;
        case 5: scores<5>(*a); return 0;
        case 6: scores<6>(*a); return 0;
        case 7: scores<7>(*a); return 0;
        case 8: scores<8>(*a); return 0;
        default: return -1;
    }
}
