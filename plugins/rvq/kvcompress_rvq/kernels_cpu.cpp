// RVQ on the CPU (loaded by kvcompress_kernels.native), the C++ twins of kvcompress_rvq.kernels' torch references:
// rvq_encode_cpu (residual_encode_torch), rvq_lut_scores_cpu (lut_scores_torch) and rvq_lut_mix_cpu
// (lut_mix_torch), the last two for 8-bit codes (one byte per code: read in place).
//
// Encoding: every level of the residual coding of a block of vectors in one pass.
// The torch path writes each level's distance matrix [rows, codewords] to memory and reads it back to find the
// minimum; here a block of R rows is scored against CW codewords at a time in registers (each codeword load
// serves R rows), the running minimum kept per lane, so no distance ever leaves the core. Ranking as in the
// reference: ||c||^2 - 2 <r, c>, ties to the lowest index.
// Where the CPU has AMX tiles (compiled for with -march=native, granted by the OS at run time) and the group width
// is a multiple of 32, the scores come from bf16 tile products instead, 16 codewords by 16 vectors per tile, two
// blocks of 32 vectors in turn: each float split into a bf16 high part and a bf16 remainder, hi*hi + hi*lo + lo*hi,
// which keeps about 16 bits of each product (float32 keeps 24: codes differ only between near-tied codewords).
// 2.1x faster than the registers on one core of a Sapphire Rapids CPU (19 against 40 ms for 24576 vectors x 11
// levels of 256 codewords).
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define RVQ_TILES 1
#endif

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
constexpr int R = 4;    // rows per block
constexpr int V = 4;    // vectors of 16 codewords per tile
constexpr int CW = 16 * V;
constexpr int TR = 32;  // rows per AMX block: two halves of 16, scored side by side

struct Args {
    int64_t rows, width, depth, size, padded;  // padded: size rounded up to a multiple of CW
    const float *vectors;                      // [rows, width]
    const float *transposed;                   // [depth, width, padded]: channel k of codeword c at [level][k][c]
    const float *norms;                        // [depth, padded]: ||c||^2, +inf on the padding
    const float *codebooks;                    // [depth, size, width]
    int64_t *codes;                            // [rows, depth]
    int64_t threads;
    int64_t tiles;                             // 1: AMX tiles where they work, 0: the float32 registers
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

#ifdef RVQ_TILES
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16 __attribute__((vector_size(32)));

bool tiles_granted() {  // Linux hands out the tile registers' state only on request
    static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return granted;
}

// 16 floats x = hi + lo to about 16 bits, as bf16 bit patterns: hi is x truncated (the remainder is exact), lo the
// remainder rounded.
inline void split16(const float *x, float factor, uint16_t *hi, uint16_t *lo) {
    v16 v = load(x) * factor;
    u16v bits;
    std::memcpy(&bits, &v, 64);
    const u16v top = bits & 0xFFFF0000u;
    v16 high;
    std::memcpy(&high, &top, 64);
    const v16 rest = v - high;
    u16v rest_bits;
    std::memcpy(&rest_bits, &rest, 64);
    const h16 h = __builtin_convertvector(top >> 16, h16), l = __builtin_convertvector((rest_bits + 0x8000u) >> 16, h16);
    std::memcpy(hi, &h, 32);
    std::memcpy(lo, &l, 32);
}

// Zeroed memory in whole 64-byte lines: a tile row split over two lines loads and stores at a fraction of the speed.
template <class T>
struct Lines {
    std::vector<v16> lines;
    explicit Lines(int64_t count) : lines((count * sizeof(T) + 63) / 64) {}
    T *data() { return reinterpret_cast<T *>(lines.data()); }
    const T *data() const { return reinterpret_cast<const T *>(lines.data()); }
    T &operator[](int64_t i) { return data()[i]; }
};

struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// Codebooks times -2 as the products' first operand: per level, tile of 16 codewords and chunk of 32 channels a
// [16 codewords][32 channels] bf16 tile (high parts and remainders), zero on the padding; and the codewords' squared
// norms as the products' starting value (row c: ||c||^2 in every lane, +inf on the padding). Then a product tile holds
// ||c||^2 - 2 <c, r> for 16 codewords (rows) by 16 vectors (columns), and the nearest codeword of all 16 vectors is
// a running minimum down the rows: no horizontal reduction.
struct TileBooks {
    int64_t chunks, tiles;
    Lines<uint16_t> hi, lo;
    Lines<float> norms;  // [depth][padded][16]
    TileBooks(const Args &a)
        : chunks(a.width / 32), tiles(a.padded / 16), hi(a.depth * tiles * chunks * 512),
          lo(a.depth * tiles * chunks * 512), norms(a.depth * a.padded * 16) {
        for (int64_t level = 0; level < a.depth; level++) {
            for (int64_t c = 0; c < a.size; c++)
                for (int64_t k = 0; k < a.width; k += 16) {
                    const int64_t at = ((level * tiles + c / 16) * chunks + k / 32) * 512 + (c % 16) * 32 + k % 32;
                    split16(a.codebooks + (level * a.size + c) * a.width + k, -2.0f, &hi[at], &lo[at]);
                }
            for (int64_t c = 0; c < a.padded; c++)
                for (int l = 0; l < 16; l++) norms[(level * a.padded + c) * 16 + l] = a.norms[level * a.padded + c];
        }
    }
    const uint16_t *at(const Lines<uint16_t> &part, int64_t level, int64_t tile, int64_t chunk) const {
        return part.data() + ((level * tiles + tile) * chunks + chunk) * 512;
    }
    const float *start(int64_t level, int64_t tile) const { return norms.data() + (level * tiles + tile) * 256; }
};

// 16 rows of 16 words transposed in place: four rounds, each swapping one bit of the row index with the same bit
// of the lane index (two-source permutes).
inline void transpose16(i16 *m) {
    for (int s = 8; s > 0; s /= 2) {
        i16 low, high;  // where the lanes of new rows i (bit s of i clear) and i + s come from
        for (int l = 0; l < 16; l++) {
            low[l] = l & s ? 16 + l - s : l;
            high[l] = l & s ? 16 + l : l + s;
        }
        for (int i = 0; i < 16; i++)
            if (!(i & s)) {
                const i16 a = m[i], b = m[i + s];
                m[i] = __builtin_shuffle(a, b, low);
                m[i + s] = __builtin_shuffle(a, b, high);
            }
    }
}

// TR vectors on their way through the levels, in two halves of 16: residuals and their split parts row by row
// (a chunk of 32 channels is 16 words per part), the products' second operand per half and chunk (word [p][v]: the
// parts of channels 2p and 2p+1 of vector v, the row words transposed), and the last products [codeword][vector].
struct Block {
    int64_t width, chunks, start = 0;
    int live = 0;
    std::vector<float> residual;       // [TR][width]
    Lines<uint16_t> hi_rows, lo_rows;  // [TR][width]
    Lines<i16> hi, lo;                 // [2][chunks][16]
    Lines<float> scores;               // [padded][TR]
    Block(int64_t w, int64_t padded)
        : width(w), chunks(w / 32), residual(TR * w), hi_rows(TR * w), lo_rows(TR * w), hi(2 * chunks * 16),
          lo(2 * chunks * 16), scores(padded * TR) {}
    void begin(const float *vectors, int64_t first, int count) {  // a dead slot repeats the last live row
        start = first;
        live = count;
        for (int r = 0; r < TR; r++) {
            std::memcpy(&residual[r * width], vectors + (first + (r < live ? r : live - 1)) * width, width * 4);
            split(r);
        }
        interleave();
    }
    void split(int r) {
        for (int64_t k = 0; k < width; k += 16)
            split16(&residual[r * width + k], 1.0f, &hi_rows[r * width + k], &lo_rows[r * width + k]);
    }
    void interleave() {
        for (int h = 0; h < 2; h++)
            for (int64_t k = 0; k < chunks; k++) {
                i16 *high = &hi[(h * chunks + k) * 16], *low = &lo[(h * chunks + k) * 16];
                for (int v = 0; v < 16; v++) {
                    std::memcpy(&high[v], &hi_rows[(16 * h + v) * width + 32 * k], 64);
                    std::memcpy(&low[v], &lo_rows[(16 * h + v) * width + 32 * k], 64);
                }
                transpose16(high);
                transpose16(low);
            }
    }
};

// ||c||^2 - 2 <c, r> of every codeword of the level with the block's vectors, into block.scores.
void products(const TileBooks &books, int64_t level, Block &block) {
    for (int64_t tile = 0; tile < books.tiles; tile++) {
        _tile_loadd(6, books.start(level, tile), 64);
        _tile_loadd(7, books.start(level, tile), 64);
        for (int64_t k = 0; k < books.chunks; k++) {
            _tile_loadd(0, books.at(books.hi, level, tile, k), 64);
            _tile_loadd(1, books.at(books.lo, level, tile, k), 64);
            if (books.chunks > 1 || tile == 0) {  // one chunk: the vectors' tiles stay loaded for the level
                _tile_loadd(2, &block.hi[k * 16], 64);
                _tile_loadd(3, &block.lo[k * 16], 64);
                _tile_loadd(4, &block.hi[(books.chunks + k) * 16], 64);
                _tile_loadd(5, &block.lo[(books.chunks + k) * 16], 64);
            }
            _tile_dpbf16ps(6, 0, 2);
            _tile_dpbf16ps(6, 0, 3);
            _tile_dpbf16ps(6, 1, 2);
            _tile_dpbf16ps(7, 0, 4);
            _tile_dpbf16ps(7, 0, 5);
            _tile_dpbf16ps(7, 1, 4);
        }
        _tile_stored(6, &block.scores[tile * 16 * TR], TR * 4);
        _tile_stored(7, &block.scores[tile * 16 * TR + 16], TR * 4);
    }
}

// The level's codes from block.scores, then the residuals and operands for the next level.
void nearest(const Args &a, int64_t level, Block &block) {
    const i16 zero{};
    for (int h = 0; h < 2 && 16 * h < block.live; h++) {
        // four running minima over codewords c = j mod 4 (one chain would wait on each compare), merged with ties
        // to the lower index
        v16 best[4];
        i16 best_index[4];
        for (int j = 0; j < 4; j++) {
            best[j] = v16{} + std::numeric_limits<float>::infinity();
            best_index[j] = zero + j;
        }
        for (int64_t c = 0; c < a.padded; c += 4)
            for (int j = 0; j < 4; j++) {
                const v16 score = load(&block.scores[(c + j) * TR + 16 * h]);
                const i16 better = score < best[j];  // strict: the lowest index wins a tie
                best[j] = better ? score : best[j];
                best_index[j] = better ? zero + (int32_t)(c + j) : best_index[j];
            }
        for (int j = 1; j < 4; j++) {
            const i16 better = (best[j] < best[0]) | ((best[j] == best[0]) & (best_index[j] < best_index[0]));
            best_index[0] = better ? best_index[j] : best_index[0];
            best[0] = better ? best[j] : best[0];
        }
        for (int v = 0; v < 16 && 16 * h + v < block.live; v++) {
            const int r = 16 * h + v;
            a.codes[(block.start + r) * a.depth + level] = best_index[0][v];
            if (level + 1 == a.depth) continue;
            const float *codeword = a.codebooks + (level * a.size + best_index[0][v]) * a.width;
            for (int64_t k = 0; k < a.width; k++) block.residual[r * a.width + k] -= codeword[k];
            block.split(r);
        }
    }
    if (level + 1 < a.depth) block.interleave();
}

// Two blocks in turn, so that one block's tile products can overlap the other's minimum search and residual update
// (3 % faster than one block at a time on this machine's Sapphire Rapids: 17.4 against 17.9 ms on one thread).
void encode_rows_tiles(const Args &a, const TileBooks &books, int64_t begin, int64_t end) {
    TileConfig config;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
    Block blocks[2] = {Block(a.width, a.padded), Block(a.width, a.padded)};
    for (int64_t start = begin; start < end; start += 2 * TR) {
        int count = 0;
        for (; count < 2 && start + count * TR < end; count++) {
            const int64_t first = start + count * TR;
            blocks[count].begin(a.vectors, first, end - first < TR ? (int)(end - first) : TR);
        }
        for (int64_t level = 0; level < a.depth; level++) {
            for (int b = 0; b < count; b++) products(books, level, blocks[b]);
            for (int b = 0; b < count; b++) nearest(a, level, blocks[b]);
        }
    }
    _tile_release();
}
#endif

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

// Whether rvq_encode_cpu can use AMX tiles here (built for them and granted by the kernel).
extern "C" int rvq_encode_tiles_cpu() {
#ifdef RVQ_TILES
    return tiles_granted();
#else
    return 0;
#endif
}

// Codes [rows, depth] of `rows` vectors; rows split over `threads` threads.
extern "C" void rvq_encode_cpu(const Args *a) {
    const bool tiles = a->tiles && a->width % 32 == 0 && rvq_encode_tiles_cpu();
    const int64_t block = tiles ? 2 * TR : R;
    const int64_t threads = a->threads > 1 && a->rows >= 256 * a->threads ? a->threads : 1;
    const int64_t share = ((a->rows + threads - 1) / threads + block - 1) / block * block;  // whole blocks
#ifdef RVQ_TILES
    const std::unique_ptr<TileBooks> books(tiles ? new TileBooks(*a) : nullptr);
#endif
    auto encode = [&](int64_t begin, int64_t end) {
#ifdef RVQ_TILES
        if (books) return encode_rows_tiles(*a, *books, begin, end);
#endif
        encode_rows(*a, begin, end);
    };
    // torch's OpenMP threads where the library was built with OpenMP (kvcompress_kernels.native), else this one
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t t = 0; t < threads; t++) {
        const int64_t begin = t * share, end = begin + share < a->rows ? begin + share : a->rows;
        if (begin < end) encode(begin, end);
    }
}
