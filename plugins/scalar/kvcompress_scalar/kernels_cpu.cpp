// Scalar codes read on the CPU for decode-sized query blocks (loaded by kvcompress_kernels.native): the C++ twins of
// kvcompress_scalar.estimator's torch reads for min/max codes with axis token and for Lloyd-Max codes (scores and
// mix), and the scores of min/max codes with axis channel (KIVI's keys; see scalar_channel_scores_cpu).
// A token's row holds `dim` codes of `bits` bits (2, 4 or 8, LSB first); channel group g of token t stands for
//   scale[t, g] * value(code) + minimum[t, g]        value(code) = levels[code] (Lloyd-Max) or the code itself
// (Lloyd-Max passes norm / sqrt(group) as the scale and no minimum).
//   scores: out[q, t] = sum_c query[q, c] * (scale[t, g(c)] value(code[t, c]) + minimum[t, g(c)])
//   mix:    out[q, c] = sum_t weights[q, t] * (scale[t, g(c)] value(code[t, c]) + minimum[t, g(c)])
// Each 16 bytes of a row widen at once: byte j into one lane, its 8 / bits codes into as many vectors (shift and
// mask), so lane j of vector i holds channel 16 * (8 / bits) * chunk + (8 / bits) * j + i. The query (scores) and
// the accumulators (mix) live in that order, permuted once per call. Scores sum each token's lanes through a
// transposing tree over 16 tokens at a time (one vector of 16 sums); the mix needs no sum across lanes.
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef uint8_t b16 __attribute__((vector_size(16)));
constexpr int TOKENS = 16;    // tokens summed by one transposing tree
constexpr int SPLIT = 1024;   // tokens per parallel work item

struct Args {
    int64_t batch, heads, tokens, queries, dim, group, bits;
    const uint8_t *codes;  // (b, h, t) row of dim * bits / 8 bytes at b * codes_b + h * codes_h + t * row bytes
    int64_t codes_b, codes_h;
    const float *scale;    // token axis: [b, h, t, dim / group]; channel axis: [b, h, t / group, dim]
    const float *minimum;  // the same shape, or null
    const float *levels;   // [2^bits] (bits <= 4), or null: the codes are the values
    const float *input;    // scores: query [b, h, n, dim]; mix: weights [b, h, n, t]
    float *out;            // scores: [b, h, n, t]; mix: [b, h, n, dim]
};

// 16 bytes zero-extended to 16 int32 lanes (g++ 12 builds __builtin_convertvector of bytes lane by lane)
inline i16 widen_bytes(const uint8_t *p) {
#ifdef __AVX512F__
    // the zero-masking form: the plain one trips g++ 12's maybe-uninitialized warning inside the intrinsic
    const __m512i wide = _mm512_maskz_cvtepu8_epi32(0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
    i16 out;
    std::memcpy(&out, &wide, 64);
    return out;
#else
    b16 bytes;
    std::memcpy(&bytes, p, 16);
    return __builtin_convertvector(bytes, i16);
#endif
}

// Where the lanes of a row's widened vectors come from: channel of (chunk, vector, lane), and each lane's channel
// group (token-axis codes).
struct Layout {
    int64_t per_byte, chunks, vectors;  // codes per byte; 16-byte chunks per row; vectors per chunk (= per_byte)
    int64_t rows, width;                // bytes per row; vectors per row
    std::vector<i16> group_of;          // [chunks]: the channel group of each lane (the same for every vector)
    explicit Layout(const Args &a)
        : per_byte(8 / a.bits), chunks(a.dim * a.bits / 128), vectors(8 / a.bits), rows(a.dim * a.bits / 8),
          width(chunks * vectors) {
        group_of.resize(chunks);
        for (int64_t c = 0; c < chunks; c++)
            for (int j = 0; j < 16; j++) group_of[c][j] = (int32_t)(channel(c, 0, j) / a.group);
    }
    int64_t channel(int64_t chunk, int64_t vector, int lane) const {
        return 16 * per_byte * chunk + per_byte * lane + vector;
    }
};

// The first `groups` (<= 16) floats at p in a vector's first lanes. A masked load: scalar stores into the vector
// and then a vector load of it would stall on store forwarding at every token.
inline v16 load_groups(const float *p, int64_t groups) {
#ifdef __AVX512F__
    const __m512 loaded = _mm512_maskz_loadu_ps((__mmask16)((1u << groups) - 1), p);
    v16 out;
    std::memcpy(&out, &loaded, 64);
    return out;
#else
    v16 out{};
    for (int64_t g = 0; g < groups; g++) out[g] = p[g];
    return out;
#endif
}

// One token's values times its scale per lane, [chunks * vectors] vectors in the layout's order.
// (scale null: the values alone, for channel-axis codes whose scale goes into the query).
inline void widen(const Args &a, const Layout &layout, const uint8_t *row, const float *scale, v16 levels, v16 *out) {
    const v16 scales = scale ? load_groups(scale, a.dim / a.group) : v16{} + 1.0f;
    const int32_t mask = (1 << a.bits) - 1;
    for (int64_t c = 0; c < layout.chunks; c++) {
        const i16 wide = widen_bytes(row + 16 * c);
        const v16 lane_scale = scale ? __builtin_shuffle(scales, layout.group_of[c]) : scales;
        for (int64_t i = 0; i < layout.vectors; i++) {
            const i16 code = (wide >> (int32_t)(a.bits * i)) & mask;
            const v16 value = a.levels ? __builtin_shuffle(levels, code) : __builtin_convertvector(code, v16);
            out[c * layout.vectors + i] = value * lane_scale;
        }
    }
}

// Masks of the transposing tree: at width w (lanes per token in each input vector), output lane l takes lane
// first[w][l] of x (< 16) or y (>= 16) and adds lane second[w][l].
struct Tree {
    i16 first[5], second[5];  // indexed by log2(w): w = 16, 8, 4, 2
    Tree() {
        for (int level = 1, w = 16; w > 1; level++, w /= 2) {
            const int m = 16 / w, half = w / 2;
            for (int l = 0; l < 16; l++) {
                const int item = l / half, offset = l % half;
                const int source = (item < m ? 0 : 16) + (item % m) * w + offset;
                first[level][l] = source;
                second[level][l] = source + half;
            }
        }
    }
};
const Tree TREE;

// sums[j] = sum of the lanes of acc[j], j < 16 (acc is overwritten).
inline v16 lane_sums(v16 *acc) {
    int count = 16;
    for (int level = 1; count > 1; level++, count /= 2)
        for (int k = 0; k < count / 2; k++)
            acc[k] = __builtin_shuffle(acc[2 * k], acc[2 * k + 1], TREE.first[level]) +
                     __builtin_shuffle(acc[2 * k], acc[2 * k + 1], TREE.second[level]);
    return acc[0];
}

// Lane j: <query, token j's values> for the first `live` tokens of a block (0 beyond), [width] vectors each.
inline v16 block_dots(const v16 *query, const v16 *values, int live, int64_t width, v16 *acc) {
    for (int k = 0; k < TOKENS; k++) {
        v16 sum{};
        if (k < live)
            for (int64_t v = 0; v < width; v++) sum += query[v] * values[k * width + v];
        acc[k] = sum;
    }
    return lane_sums(acc);
}

// The parallel work: up to SPLIT tokens of one (sequence, KV head) per item.
inline int64_t splits(const Args &a) { return (a.tokens + SPLIT - 1) / SPLIT; }

struct Item {
    int64_t bh, begin, end;  // bh: batch * heads index; tokens begin..end
    const uint8_t *codes;    // that head's first row
    Item(const Args &a, int64_t item) {
        const int64_t count = splits(a);
        bh = item / count;
        begin = item % count * SPLIT;
        end = begin + SPLIT < a.tokens ? begin + SPLIT : a.tokens;
        codes = a.codes + bh / a.heads * a.codes_b + bh % a.heads * a.codes_h;
    }
};

// A row of `dim` floats in the layout's lane order, [chunks * vectors] vectors.
inline void permute(const Layout &layout, const float *row, v16 *out) {
    for (int64_t c = 0; c < layout.chunks; c++)
        for (int64_t i = 0; i < layout.vectors; i++)
            for (int j = 0; j < 16; j++) out[c * layout.vectors + i][j] = row[layout.channel(c, i, j)];
}

v16 level_vector(const Args &a) {
    v16 levels{};
    if (a.levels)
        for (int i = 0; i < (1 << a.bits); i++) levels[i] = a.levels[i];
    return levels;
}

}  // namespace

extern "C" void scalar_token_scores_cpu(const Args *a) {
    const Layout layout(*a);
    const int64_t n = a->queries, t = a->tokens, dim = a->dim, groups = dim / a->group, width = layout.width;
    const v16 levels = level_vector(*a);
#pragma omp parallel for schedule(static)
    for (int64_t index = 0; index < a->batch * a->heads * splits(*a); index++) {
        const Item item(*a, index);
        const int64_t bh = item.bh;
        // the queries in the layout's order, and each query's sum per channel group (for the minimum)
        std::vector<v16> query(n * width), values(TOKENS * width), acc(TOKENS);
        std::vector<float> group_sums(n * groups, 0.0f);
        for (int64_t q = 0; q < n; q++) {
            const float *row = a->input + (bh * n + q) * dim;
            permute(layout, row, &query[q * width]);
            for (int64_t ch = 0; ch < dim; ch++) group_sums[q * groups + ch / a->group] += row[ch];
        }
        for (int64_t start = item.begin; start < item.end; start += TOKENS) {
            const int live = item.end - start < TOKENS ? (int)(item.end - start) : TOKENS;
            for (int k = 0; k < live; k++)
                widen(*a, layout, item.codes + (start + k) * layout.rows, a->scale + (bh * t + start + k) * groups,
                      levels, &values[k * width]);
            for (int64_t q = 0; q < n; q++) {
                const v16 sums = block_dots(&query[q * width], values.data(), live, width, acc.data());
                float *out = a->out + (bh * n + q) * t + start;
                for (int k = 0; k < live; k++) {
                    float offset = 0.0f;
                    if (a->minimum)
                        for (int64_t g = 0; g < groups; g++)
                            offset += a->minimum[(bh * t + start + k) * groups + g] * group_sums[q * groups + g];
                    out[k] = sums[k] + offset;
                }
            }
        }
    }
}

// Channel-axis min/max codes (KIVI's keys): scale and minimum per channel and group of `group` tokens (a multiple
// of 16 dividing SPLIT, so a block of 16 tokens lies in one group), folded into the query once per group:
//   out[q, t] = sum_c (query[q, c] scale[G(t), c]) code[t, c] + sum_c query[q, c] minimum[G(t), c]
extern "C" void scalar_channel_scores_cpu(const Args *a) {
    const Layout layout(*a);
    const int64_t n = a->queries, t = a->tokens, dim = a->dim, group = a->group, width = layout.width;
#pragma omp parallel for schedule(static)
    for (int64_t index = 0; index < a->batch * a->heads * splits(*a); index++) {
        const Item item(*a, index);
        const int64_t bh = item.bh;
        std::vector<v16> scaled(n * width), scale(width), values(TOKENS * width), acc(TOKENS);
        std::vector<float> offset(n);
        for (int64_t start = item.begin; start < item.end; start += TOKENS) {
            const int live = item.end - start < TOKENS ? (int)(item.end - start) : TOKENS;
            if (start % group == 0) {  // a new token group: its scale into the queries, its minimum into offsets
                const int64_t row = (bh * (t / group) + start / group) * dim;
                permute(layout, a->scale + row, scale.data());
                for (int64_t q = 0; q < n; q++) {
                    const float *query = a->input + (bh * n + q) * dim;
                    permute(layout, query, &scaled[q * width]);
                    for (int64_t v = 0; v < width; v++) scaled[q * width + v] *= scale[v];
                    float sum = 0.0f;
                    for (int64_t ch = 0; ch < dim; ch++) sum += query[ch] * a->minimum[row + ch];
                    offset[q] = sum;
                }
            }
            for (int k = 0; k < live; k++)
                widen(*a, layout, item.codes + (start + k) * layout.rows, nullptr, v16{}, &values[k * width]);
            for (int64_t q = 0; q < n; q++) {
                const v16 sums = block_dots(&scaled[q * width], values.data(), live, width, acc.data());
                float *out = a->out + (bh * n + q) * t + start;
                for (int k = 0; k < live; k++) out[k] = sums[k] + offset[q];
            }
        }
    }
}

extern "C" void scalar_token_mix_cpu(const Args *a) {
    const Layout layout(*a);
    const int64_t n = a->queries, t = a->tokens, dim = a->dim, groups = dim / a->group, width = layout.width;
    const int64_t items = a->batch * a->heads * splits(*a);
    const v16 levels = level_vector(*a);
    // per work item: [n][width] accumulators in the layout's order and [n][groups] weighted minima
    std::vector<v16> partial(items * n * width);
    std::vector<float> minima(items * n * groups, 0.0f);
#pragma omp parallel for schedule(static)
    for (int64_t index = 0; index < items; index++) {
        const Item item(*a, index);
        const int64_t bh = item.bh;
        std::vector<v16> values(width);
        v16 *acc = &partial[index * n * width];
        for (int64_t tok = item.begin; tok < item.end; tok++) {
            widen(*a, layout, item.codes + tok * layout.rows, a->scale + (bh * t + tok) * groups, levels, values.data());
            for (int64_t q = 0; q < n; q++) {
                const float weight = a->input[(bh * n + q) * t + tok];
                for (int64_t v = 0; v < width; v++) acc[q * width + v] += weight * values[v];
                if (a->minimum)
                    for (int64_t g = 0; g < groups; g++)
                        minima[(index * n + q) * groups + g] += weight * a->minimum[(bh * t + tok) * groups + g];
            }
        }
    }
    for (int64_t bh = 0; bh < a->batch * a->heads; bh++)
        for (int64_t q = 0; q < n; q++) {
            float *out = a->out + (bh * n + q) * dim;
            for (int64_t ch = 0; ch < dim; ch++) out[ch] = 0.0f;
            for (int64_t s = 0; s < splits(*a); s++) {
                const int64_t item = bh * splits(*a) + s;
                const v16 *acc = &partial[(item * n + q) * width];
                for (int64_t c = 0; c < layout.chunks; c++)
                    for (int64_t i = 0; i < layout.vectors; i++)
                        for (int j = 0; j < 16; j++) out[layout.channel(c, i, j)] += acc[c * layout.vectors + i][j];
                for (int64_t ch = 0; ch < dim; ch++) out[ch] += minima[(item * n + q) * groups + ch / a->group];
            }
        }
}
